"""Triton Mamba-1 selective scan: chunked parallel prefill and the single-step decode update.

Same signatures and semantics as `sambay.ops.selective_scan` (read its docstring for the math).

Prefill runs in three launches so that a long sequence fills the GPU even at batch 1:
  1. `_chunk_state`: each (row, channel block, chunk) runs the recurrence from h = 0 over its chunk
     and stores the chunk's end state and its total decay Π exp(Δ_t A);
  2. `_chunk_combine`: per (row, channel block), a short sequential pass over chunks turns those into
     the true state at the start of every chunk (and the final state);
  3. `_chunk_output`: each chunk reruns the recurrence from its true start state and writes y,
     applying the D skip and the silu(z) gate.
A sequence of at most one chunk skips 1 and 2. Every program keeps its (BLOCK_D, d_state) state in
registers in fp32; the time loop inside a chunk is sequential, the parallelism is rows × channel
blocks × chunks.

Row (batch) program ids are widened to int64 before they scale a stride: a 32K-token cache of 64 rows
holds more than 2^31 elements, and int32 offsets would wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tokens per chunk: 32K tokens give 128 chunks × 80 channel blocks at d_inner 5120, enough programs to
# fill 132 SMs at batch 1, while each program's sequential loop stays short.
CHUNK = 256
BLOCK_D = 64  # channels per program: 64 × d_state 16 fp32 state = 16 registers per thread at 2 warps


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _step(h, u_ptr, dt_ptr, b_ptr, bias, A, t, offs_d, offs_n, mask_d, s_ut, s_dtt, s_bt, n_valid):
    """One recurrence step at time t; returns (h, u, decay). Past the row's valid length (which is
    at most T) Δ = 0 and u = 0, so the state is frozen and nothing is read out of bounds."""
    live = t < n_valid
    u = tl.load(u_ptr + t * s_ut + offs_d, mask=mask_d & live, other=0.0).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + t * s_dtt + offs_d, mask=mask_d & live, other=0.0).to(tl.float32) + bias)
    dt = tl.where(live, dt, 0.0)
    Bt = tl.load(b_ptr + t * s_bt + offs_n, mask=(offs_n >= 0) & live, other=0.0).to(tl.float32)
    decay = tl.exp(dt[:, None] * A)
    h = decay * h + (dt * u)[:, None] * Bt[None, :]
    return h, u, decay


@triton.jit
def _chunk_state(
    u_ptr, dt_ptr, A_ptr, b_ptr, bias_ptr, len_ptr, hloc_ptr, dec_ptr,  # pointers
    T, D, n_chunks,  # dimensions
    s_ub, s_ut, s_dtb, s_dtt, s_bb, s_bt,  # strides (u/delta channels and B states are contiguous)
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_T: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < D
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    n_valid = tl.load(len_ptr + pid_b)
    h = tl.zeros((BLOCK, N), dtype=tl.float32)
    total = tl.full((BLOCK, N), 1.0, dtype=tl.float32)
    t0 = pid_c * CHUNK_T
    for i in range(CHUNK_T):  # a fixed trip count; steps past T are no-ops (see _step)
        t = t0 + i
        h, _, decay = _step(h, u_ptr + pid_b * s_ub, dt_ptr + pid_b * s_dtb, b_ptr + pid_b * s_bb, bias, A, t,
                            offs_d, offs_n, mask_d, s_ut, s_dtt, s_bt, n_valid)
        total = total * decay
    out = ((pid_b * n_chunks + pid_c) * D + offs_d[:, None]) * N + offs_n[None, :]
    tl.store(hloc_ptr + out, h, mask=mask_d[:, None])
    tl.store(dec_ptr + out, total, mask=mask_d[:, None])


@triton.jit
def _chunk_combine(
    hloc_ptr, dec_ptr, h0_ptr, hstart_ptr,  # pointers
    D, n_chunks,  # dimensions
    N: tl.constexpr, BLOCK: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask = (offs_d < D)[:, None]
    cell = offs_d[:, None] * N + offs_n[None, :]
    h = tl.load(h0_ptr + pid_b * D * N + cell, mask=mask, other=0.0)
    for c in range(n_chunks):
        at = (pid_b * n_chunks + c) * D * N + cell
        tl.store(hstart_ptr + at, h, mask=mask)
        h = tl.load(dec_ptr + at, mask=mask, other=0.0) * h + tl.load(hloc_ptr + at, mask=mask, other=0.0)


@triton.jit
def _chunk_output(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, hstart_ptr, y_ptr, hend_ptr,  # pointers
    T, D, n_chunks,  # dimensions
    s_ub, s_ut, s_dtb, s_dtt, s_bb, s_bt, s_cb, s_ct, s_zb, s_zt, s_yb, s_yt,  # strides
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_T: tl.constexpr, HAS_Z: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < D
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    n_valid = tl.load(len_ptr + pid_b)
    cell = offs_d[:, None] * N + offs_n[None, :]
    h = tl.load(hstart_ptr + (pid_b * n_chunks + pid_c) * D * N + cell, mask=mask_d[:, None], other=0.0)
    t0 = pid_c * CHUNK_T
    for i in range(CHUNK_T):
        t = t0 + i
        h, u, _ = _step(h, u_ptr + pid_b * s_ub, dt_ptr + pid_b * s_dtb, b_ptr + pid_b * s_bb, bias, A, t,
                        offs_d, offs_n, mask_d, s_ut, s_dtt, s_bt, n_valid)
        in_range = t < T
        Ct = tl.load(c_ptr + pid_b * s_cb + t * s_ct + offs_n, mask=(offs_n >= 0) & in_range, other=0.0)
        y = tl.sum(h * Ct.to(tl.float32)[None, :], axis=1) + skip * u
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * s_zb + t * s_zt + offs_d, mask=mask_d & in_range, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + pid_b * s_yb + t * s_yt + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d & in_range)
    if pid_c == n_chunks - 1:
        tl.store(hend_ptr + pid_b * D * N + cell, h, mask=mask_d[:, None])


def _check_last_dim(name: str, x: Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")


def selective_scan(
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
    """Triton selective scan; see `selective_scan_ref` for arguments, shapes and returns."""
    b, t, d = u.shape
    n = A.shape[-1]
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C)) + ((("z", z),) if z is not None else ()):
        _check_last_dim(name, x)
    if delta.shape != u.shape or B.shape != (b, t, n) or C.shape != (b, t, n) or A.shape != (d, n):
        raise ValueError("selective_scan: inconsistent shapes")
    A = A.float().contiguous()
    dev = u.device
    n_chunks = triton.cdiv(t, CHUNK)
    lengths = torch.full((b,), t, dtype=torch.int32, device=dev) if lengths is None else lengths.to(torch.int32)
    h0 = torch.zeros(b, d, n, device=dev) if initial_state is None else initial_state.float().contiguous()
    y = torch.empty(b, t, d, device=dev, dtype=u.dtype)
    h_end = torch.empty(b, d, n, device=dev)
    grid_d = triton.cdiv(d, BLOCK_D)
    if n_chunks == 1:
        h_start = h0
    else:
        h_loc = torch.empty(b, n_chunks, d, n, device=dev)
        decay = torch.empty_like(h_loc)
        _chunk_state[(b, grid_d, n_chunks)](
            u, delta, A, B, delta_bias, lengths, h_loc, decay,
            t, d, n_chunks,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
            N=n, BLOCK=BLOCK_D, CHUNK_T=CHUNK, num_warps=2,
        )
        h_start = torch.empty_like(h_loc)
        _chunk_combine[(b, grid_d)](h_loc, decay, h0, h_start, d, n_chunks, N=n, BLOCK=BLOCK_D, num_warps=2)
    zz = z if z is not None else u  # a placeholder pointer when there is no gate (HAS_Z=False)
    _chunk_output[(b, grid_d, n_chunks)](
        u, delta, A, B, C, D, zz, delta_bias, lengths, h_start, y, h_end,
        t, d, n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
        C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1),
        N=n, BLOCK=BLOCK_D, CHUNK_T=CHUNK, HAS_Z=z is not None, num_warps=2,
    )
    return y, h_end


@triton.jit
def _state_update(
    state_ptr, u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, idx_ptr,  # pointers
    D,  # dimensions
    s_u, s_dt, s_b, s_c, s_z, s_y,  # row strides
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_Z: tl.constexpr, HAS_INDEX: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < D
    row = tl.load(idx_ptr + pid_b).to(tl.int64) if HAS_INDEX else pid_b  # the state row of this batch row
    cell = row * D * N + offs_d[:, None] * N + offs_n[None, :]
    h = tl.load(state_ptr + cell, mask=mask_d[:, None], other=0.0)
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
    u = tl.load(u_ptr + pid_b * s_u + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + pid_b * s_dt + offs_d, mask=mask_d, other=0.0).to(tl.float32) + bias)
    Bt = tl.load(b_ptr + pid_b * s_b + offs_n).to(tl.float32)
    Ct = tl.load(c_ptr + pid_b * s_c + offs_n).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
    tl.store(state_ptr + cell, h, mask=mask_d[:, None])
    y = tl.sum(h * Ct[None, :], axis=1) + tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * u
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * s_y + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update(
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
    """Triton single decode step; see `selective_state_update_ref`. ``state`` (fp32) is updated in place."""
    b, d = u.shape
    n = A.shape[-1]
    rows = b if state_index is None else state.shape[0]
    if state.dtype != torch.float32 or not state.is_contiguous() or state.shape != (rows, d, n):
        raise ValueError("selective_state_update: state must be a contiguous fp32 (b, d, n) tensor")
    if state_index is not None and (state_index.shape != (b,) or state_index.is_floating_point()):
        raise ValueError(f"selective_state_update: state_index must be a ({b},) integer tensor")
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C)) + ((("z", z),) if z is not None else ()):
        _check_last_dim(name, x)
    y = torch.empty_like(u)
    zz = z if z is not None else u
    _state_update[(b, triton.cdiv(d, BLOCK_D))](
        state, u, delta, A.float().contiguous(), B, C, D, zz, delta_bias, y,
        u if state_index is None else state_index.contiguous(),
        d,
        u.stride(0), delta.stride(0), B.stride(0), C.stride(0), zz.stride(0), y.stride(0),
        N=n, BLOCK=BLOCK_D, HAS_Z=z is not None, HAS_INDEX=state_index is not None, num_warps=2,
    )
    return y
