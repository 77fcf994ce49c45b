"""Mamba-1 selective scan: the reference recurrence for prefill (chunked, parallel) and decode (one step).

The classic discrete state-space recurrence of Mamba (Gu & Dao, arXiv 2312.00752, Alg. 2, eq. 2a-2b)
with zero-order-hold A and Euler B, per channel c and state index n:
    Δ_t = softplus(delta_t + delta_bias)
    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t          h: (d, n), fp32
    y_t = h_t · C_t + D ⊙ u_t          then y_t ⊙ silu(z_t) when a gate z is given

Prefill evaluates the recurrence chunk by chunk: inside a chunk of ``CHUNK`` tokens the linear
recurrence h_t = a_t h_{t-1} + b_t is an associative scan, computed with log2(CHUNK) doubling steps
over the whole (b, chunk, d, n) block (Hillis-Steele); the state is carried between chunks. That keeps
every op a large vectorised tensor op on the CPU while memory stays O(chunk · d · n).

All math is fp32 whatever the input dtype; outputs are rounded once to the dtype of ``u``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Tokens per scan chunk. 32 measured fastest on a 2-core CPU for d = 5120, n = 16 (the released model):
# the per-chunk work grows as chunk · log2(chunk), the number of Python-level steps as t / chunk.
CHUNK = 32


def _scan_chunk(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """Inclusive scan of h_t = a_t ⊙ h_{t-1} + b_t over dim 1, h_{-1} = h0. a, b: (b, L, d, n)."""
    b = torch.cat([b[:, :1] + a[:, :1] * h0.unsqueeze(1), b[:, 1:]], dim=1)
    step, length = 1, a.shape[1]
    while step < length:
        b = torch.cat([b[:, :step], torch.addcmul(b[:, step:], a[:, step:], b[:, :-step])], dim=1)
        if 2 * step < length:  # the last round needs no further products of a
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return b


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor | None,
    delta_bias: Tensor,
    initial_state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Selective scan over a chunk of tokens, continuing from a carried SSM state.

    Args:
        u: (b, t, d) input (post conv + SiLU).
        delta: (b, t, d) Δ before bias and softplus.
        A: (d, n) fp32, negative (= -exp(A_log)).
        B, C: (b, t, n) input-dependent projections.
        D: (d,) skip connection.
        z: (b, t, d) gate, or None for the ungated readout (the GMU memory).
        delta_bias: (d,).
        initial_state: (b, d, n) fp32 state before ``u`` (None: zeros).
        lengths: (b,) valid tokens per row (None: all ``t``). Padding sets Δ = 0, so the state of a
            row is frozen after its last valid token, and padded u is zeroed so it cannot inject NaN.

    Returns:
        y: (b, t, d) in ``u.dtype``.
        final_state: (b, d, n) fp32.
    """
    bsz, t, d = u.shape
    uf = u.float()
    dt = F.softplus(delta.float() + delta_bias.float())  # (b, t, d)
    if lengths is not None:
        valid = (torch.arange(t, device=u.device) < lengths.view(-1, 1)).unsqueeze(-1)  # (b, t, 1)
        dt = dt * valid
        uf = torch.where(valid, uf, 0.0)
    A, Bf, Cf = A.float(), B.float(), C.float()
    h = u.new_zeros(bsz, d, A.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    for start in range(0, t, CHUNK):
        end = min(start + CHUNK, t)
        dt_c = dt[:, start:end]  # (b, L, d)
        decay = torch.exp(dt_c.unsqueeze(-1) * A)  # (b, L, d, n)
        inject = (dt_c * uf[:, start:end]).unsqueeze(-1) * Bf[:, start:end].unsqueeze(2)  # (b, L, d, n)
        hs = _scan_chunk(decay, inject, h)  # (b, L, d, n)
        ys.append(torch.einsum("bldn,bln->bld", hs, Cf[:, start:end]))
        h = hs[:, -1]
    y = torch.cat(ys, dim=1) + uf * D.float()  # (b, t, d)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def selective_state_update_ref(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor | None,
    delta_bias: Tensor,
    state_index: Tensor | None = None,
) -> Tensor:
    """One decode step of the recurrence; updates ``state`` in place.

    Args:
        state: (b, d, n) fp32 SSM state, updated in place; with ``state_index``, (rows, d, n) of which
            batch row i owns row ``state_index[i]`` (a scheduler's slots: only the running rows are touched).
        u, delta: (b, d); A: (d, n); B, C: (b, n); D: (d,); z: (b, d) or None; delta_bias: (d,).
        state_index: (b,) int row of ``state`` for each batch row, or None (row i is row i).

    Returns:
        y: (b, d) in ``u.dtype``.
    """
    uf = u.float()
    dt = F.softplus(delta.float() + delta_bias.float())  # (b, d)
    decay = torch.exp(dt.unsqueeze(-1) * A.float())  # (b, d, n)
    before = state if state_index is None else state[state_index.long()]
    h = torch.addcmul(decay * before.float(), (dt * uf).unsqueeze(-1), B.float().unsqueeze(1))
    if state_index is None:
        state.copy_(h)
    else:
        state[state_index.long()] = h
    y = torch.einsum("bdn,bn->bd", h, C.float()) + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
