"""Triton selective scan with a backward: the trainable scan (`selective_scan_trainable`).

Same signature and semantics as `sambay.ops.selective_scan.selective_scan_ref`, as a `torch.autograd.Function`:
gradients reach u, delta, A, B, C, D, z, delta_bias and the initial state. The inference kernels of
`sambay.ops.triton.selective_scan` have no backward; training on the reference scan keeps every intermediate
of its doubling scan for autograd (about 26 GB per Mamba layer at 8K tokens), which is what made training
SambaY models slow (docs/benchmarks.md, fine-tuning). Here nothing of size (b, t, d, n) is ever stored.

Forward (`_scan_forward`): one program per (row, channel block) walks the sequence, as the inference
``single_pass`` does, writing y, the final state, and the state at the start of every CKPT-token chunk
(b, chunks, d, n) in fp32: the only thing saved for backward besides the inputs.

Backward (`_scan_backward`): the same programs walk the chunks from the last to the first. For a chunk, the
state is recomputed forward from its checkpoint, each step's h_{t-1} written to a per-program scratch
(CKPT, BLOCK, n) fp32 (L2-resident: 64 KB at BLOCK 16); then the chunk is walked backward with the adjoint
λ_t = ∂L/∂h_t (g the output's gradient, gy = g ⊙ silu(z) with a gate, else g):

    λ_t = gy_t C_t + exp(Δ_{t+1} A) λ_{t+1}               (λ after the last step: ∂L/∂final_state)
    ∂u_t = gy_t D + Σ_n λ_t Δ_t B_t          ∂Δ_t = Σ_n λ_t (A exp(Δ_t A) h_{t-1} + u_t B_t)
    ∂A += λ_t Δ_t exp(Δ_t A) h_{t-1}        ∂B_t = Σ_d λ_t Δ_t u_t      ∂C_t = Σ_d gy_t h_t
    ∂D += gy_t u_t                           ∂z_t = g_t ŷ_t σ(z_t)(1 + z_t (1 - σ(z_t)))
    ∂delta_t = ∂Δ_t softplus'(delta_t + bias) = ∂Δ_t σ(delta_t + bias) (1 above softplus's threshold 20)
    ∂initial_state = exp(Δ_0 A) λ_0

(ŷ_t = C_t·h_t + D u_t is the output before the gate.) Past a row's valid length Δ = 0 and u = 0 (as in the
reference), so their gradients there are 0.

Sums over channels (∂B, ∂C) and over rows and time (∂A, ∂D, ∂bias) are written as per-program partials and
summed by torch afterwards, in a fixed order: the backward is deterministic, with no atomics.

Two algorithms (`ALGORITHM`, `chunked`):

- **sequential** (`_scan_forward`, `_scan_backward`): one program per (row, channel block) walks the whole
  sequence, forward and then backward, carrying the state or λ from chunk to chunk. Every step is done once,
  but the parallelism is rows × channel blocks only: 320 programs per row at d_inner 5120 with BLOCK 16,
  each a walk of every token, latency-bound at a batch of one row.
- **chunked**: every (row, channel block, chunk) is a program, in three passes each way. Forward: the
  inference scan's three-pass kernels (`sambay.ops.triton.selective_scan`) with CKPT-token chunks: each
  chunk from h = 0 (its local end state and total decay), the chunk-start states in one short walk over the
  chunks (these are the checkpoints), then each chunk again from its start state, writing y. Backward: λ is
  linear in what enters a chunk, so (1) `_adjoint_local` walks each chunk back from λ = 0 and keeps what
  leaves it; (2) `_adjoint_combine` walks the chunks from the last, λ into chunk c - 1 = its own part +
  chunk c's total decay × λ into chunk c (the last chunk's: ∂L/∂final_state; what leaves chunk 0:
  ∂L/∂initial_state); (3) `_scan_backward_chunks` runs the sequential algorithm's chunk body on every
  chunk at once, from the λ pass 2 gave it, on a persistent grid whose programs each own one chunk's
  scratch (so the scratch stays small, not the (b, t, d, n) state). About 1.4x the steps, CKPT times the
  programs; ∂A, ∂D and ∂bias partials are per (row, chunk), summed by torch in a fixed order.

The module is over the 400-line target because the two algorithms share the chunk body (`_chunk_backward`):
the sequential one is the baseline benchmarks/scan_train.py times the chunked one against, and what "auto" keeps for
many rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sambay.ops.selective_scan import selective_scan_ref
from sambay.ops.triton import selective_scan as scan
from sambay.ops.triton.selective_scan import _channels, _softplus

CKPT = 64  # tokens between saved states: the backward's recompute window (its scratch holds CKPT states)
BLOCK = 16  # channels per program: (16, d_state 16) fp32 state and adjoint in registers
WARPS = 4  # warps per program of both kernels (benchmarks/scan_train.py --sweep times BLOCK x WARPS)
# "sequential", "chunked", or "auto": chunked below CHUNKED_BELOW_PROGRAMS_PER_SM (`chunked`). Measured on the
# H200 (benchmarks/scan_train.py, docs/results/scan-train-chunked-h200.json, forward + backward at d_inner
# 5120): chunked 3.7 ms vs sequential 7.2 at 1 x 2K, 12.5 vs 27.7 at 1 x 8K, 12.1 vs 13.3 at 4 x 2K.
ALGORITHM = "auto"
# The sequential kernels give each (row, channel block) one program: at one row of the 900M preset (d_inner
# 3072) that is 192 programs on 132 SMs, each a walk of every token, latency-bound. The chunked algorithm
# multiplies the programs by the chunks for about 1.4x the work, so with enough rows the sequential grid fills
# the GPU and wins. Chunked still won at 9.7 sequential programs per SM (4 x 2K above); the crossing is
# untimed, so the rule keeps chunked up to 12.
CHUNKED_BELOW_PROGRAMS_PER_SM = 12
PERSISTENT_PROGRAMS_PER_SM = 8  # the chunked backward's pass 3: programs per SM, each with one chunk's scratch


@triton.jit
def _inputs(u_ptr, dt_ptr, b_ptr, bias, t, offs_d, offs_n, mask_d, n_valid):
    """Step t's (u, Δ, pre-softplus Δ + bias, B_t, live) in fp32, the pointers at step t's row; u = Δ = 0
    past the valid length."""
    live = t < n_valid
    u = tl.load(u_ptr + offs_d, mask=mask_d & live, other=0.0).to(tl.float32)
    pre = tl.load(dt_ptr + offs_d, mask=mask_d & live, other=0.0).to(tl.float32) + bias
    dt = tl.where(live, _softplus(pre), 0.0)
    Bt = tl.load(b_ptr + offs_n, mask=(offs_n >= 0) & live, other=0.0).to(tl.float32)
    return u, dt, pre, Bt, live


@triton.jit
def _scan_forward(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, len_ptr,  # inputs
    y_ptr, ckpt_ptr, final_ptr,  # outputs
    T, D, n_ckpt,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr,
):
    """y, the final state and the chunk-start states of one (row, channel block); every tensor contiguous."""
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
    cell = offs_d[:, None] * N + offs_n[None, :]
    n_valid = tl.load(len_ptr + pid_b)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * D * N + cell, mask=mask_d[:, None], other=0.0)
    else:
        h = tl.zeros((BLOCK, N), dtype=tl.float32)
    for c in range(n_ckpt):
        tl.store(ckpt_ptr + (pid_b * n_ckpt + c) * D * N + cell, h, mask=mask_d[:, None])
        for t in range(c * CKPT, tl.minimum(c * CKPT + CKPT, T)):
            row = pid_b * T + t
            u, dt, _, Bt, _ = _inputs(u_ptr + row * D, dt_ptr + row * D, b_ptr + row * N, bias, t, offs_d,
                                      offs_n, mask_d, n_valid)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            Ct = tl.load(c_ptr + row * N + offs_n).to(tl.float32)
            y = tl.sum(h * Ct[None, :], axis=1) + skip * u
            if HAS_Z:
                z = tl.load(z_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(y_ptr + row * D + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(final_ptr + pid_b * D * N + cell, h, mask=mask_d[:, None])


@triton.jit
def _chunk_backward(
    u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, gy_ptr, ckpt_ptr, scratch, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr,
    pid_b, c, T, D, n_ckpt, partial, n_valid, offs_d, offs_n, mask_d, A, bias, skip,
    lam, decay, dA, dskip, dbias,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr,
):
    """The adjoint walk of chunk c of one (row, channel block), given λ and the decay exp(Δ_{t+1} A) that carry
    into its last step: recompute the chunk's states from its checkpoint into ``scratch``, then walk it back,
    writing the per-step gradients; returns (λ, decay, dA, dskip, dbias) at the chunk's first step."""
    cell = offs_d[:, None] * N + offs_n[None, :]
    local = tl.arange(0, BLOCK)[:, None] * N + offs_n[None, :]  # a state's place in the scratch
    t0 = c * CKPT
    t1 = tl.minimum(t0 + CKPT, T)
    h = tl.load(ckpt_ptr + (pid_b * n_ckpt + c) * D * N + cell, mask=mask_d[:, None], other=0.0)
    for t in range(t0, t1):  # recompute: h_{t-1} of every step of the chunk into the scratch
        tl.store(scratch + (t - t0) * BLOCK * N + local, h)
        row = pid_b * T + t
        u, dt, _, Bt, _ = _inputs(u_ptr + row * D, dt_ptr + row * D, b_ptr + row * N, bias, t, offs_d,
                                  offs_n, mask_d, n_valid)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
    tl.debug_barrier()  # the scratch was written by other threads of this program
    for i in range(t1 - t0):
        t = t1 - 1 - i
        row = pid_b * T + t
        prev = tl.load(scratch + (t - t0) * BLOCK * N + local)  # h_{t-1}
        u, dt, pre, Bt, live = _inputs(u_ptr + row * D, dt_ptr + row * D, b_ptr + row * N, bias, t, offs_d,
                                       offs_n, mask_d, n_valid)
        Ct = tl.load(c_ptr + row * N + offs_n).to(tl.float32)
        g = tl.load(gy_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        step_decay = tl.exp(dt[:, None] * A)
        h = step_decay * prev + (dt * u)[:, None] * Bt[None, :]  # h_t
        if HAS_Z:
            z = tl.load(z_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(h * Ct[None, :], axis=1) + skip * u
            tl.store(dz_ptr + row * D + offs_d, (g * y * sig * (1.0 + z * (1.0 - sig))).to(
                dz_ptr.dtype.element_ty), mask=mask_d)
            g = g * z * sig
        lam = g[:, None] * Ct[None, :] + decay * lam  # λ_t
        tl.store(dC_ptr + (partial + t) * N + offs_n, tl.sum(tl.where(mask_d[:, None], g[:, None] * h, 0.0),
                                                              axis=0))
        lam_dt = lam * dt[:, None]
        tl.store(dB_ptr + (partial + t) * N + offs_n,
                 tl.sum(tl.where(mask_d[:, None], lam_dt * u[:, None], 0.0), axis=0))
        du = g * skip + tl.sum(lam_dt * Bt[None, :], axis=1)
        tl.store(du_ptr + row * D + offs_d, tl.where(live, du, 0.0).to(du_ptr.dtype.element_ty), mask=mask_d)
        ddt = tl.sum(lam * (A * step_decay * prev + u[:, None] * Bt[None, :]), axis=1)
        dpre = tl.where(live, ddt * tl.where(pre > 20.0, 1.0, tl.sigmoid(pre)), 0.0)
        tl.store(ddt_ptr + row * D + offs_d, dpre.to(ddt_ptr.dtype.element_ty), mask=mask_d)
        dA += lam_dt * step_decay * prev
        dskip += g * u
        dbias += dpre
        decay = step_decay
    tl.debug_barrier()  # the next chunk overwrites the scratch
    return lam, decay, dA, dskip, dbias


@triton.jit
def _scan_backward(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, ckpt_ptr, gy_ptr, gfinal_ptr,  # inputs
    scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,  # outputs
    T, D, n_ckpt, n_blocks,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr, HAS_GFINAL: tl.constexpr,
):
    """The sequential algorithm: the adjoint walk of one (row, channel block), last chunk first."""
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
    cell = offs_d[:, None] * N + offs_n[None, :]
    n_valid = tl.load(len_ptr + pid_b)
    scratch = scratch_ptr + (pid_b * n_blocks + pid_d) * CKPT * BLOCK * N
    partial = (pid_b * n_blocks + pid_d) * T  # this program's rows of the (b, blocks, t, n) partials of ∂B, ∂C
    if HAS_GFINAL:
        lam = tl.load(gfinal_ptr + pid_b * D * N + cell, mask=mask_d[:, None], other=0.0)
    else:
        lam = tl.zeros((BLOCK, N), dtype=tl.float32)
    dA = tl.zeros((BLOCK, N), dtype=tl.float32)
    dskip = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    decay = tl.full((BLOCK, N), 1.0, dtype=tl.float32)  # exp(Δ_{t+1} A): carries λ back one step
    for back in range(n_ckpt):
        lam, decay, dA, dskip, dbias = _chunk_backward(
            u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, gy_ptr, ckpt_ptr, scratch, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr,
            pid_b, n_ckpt - 1 - back, T, D, n_ckpt, partial, n_valid, offs_d, offs_n, mask_d, A, bias, skip,
            lam, decay, dA, dskip, dbias, N, BLOCK, CKPT, HAS_Z)
    tl.store(dh0_ptr + pid_b * D * N + cell, decay * lam, mask=mask_d[:, None])
    tl.store(dA_ptr + pid_b * D * N + cell, dA, mask=mask_d[:, None])
    tl.store(dD_ptr + pid_b * D + offs_d, dskip, mask=mask_d)
    tl.store(dbias_ptr + pid_b * D + offs_d, dbias, mask=mask_d)


@triton.jit
def _adjoint_local(
    dt_ptr, A_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, gy_ptr, out_ptr,
    T, D, n_ckpt,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr,
):
    """The chunked algorithm, pass 1: chunk c's own contribution to the λ that leaves it through its first step,
    exp(Δ_{t0} A) λ_{t0} computed with nothing coming in from later chunks (λ is linear in what comes in)."""
    pid_b, pid_d, c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    offs_d, offs_n, mask_d, A, bias, _ = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
    n_valid = tl.load(len_ptr + pid_b)
    t0 = c * CKPT
    t1 = tl.minimum(t0 + CKPT, T)
    lam = tl.zeros((BLOCK, N), dtype=tl.float32)
    decay = tl.full((BLOCK, N), 1.0, dtype=tl.float32)
    for i in range(t1 - t0):
        t = t1 - 1 - i
        row = pid_b * T + t
        live = t < n_valid
        dt = _softplus(tl.load(dt_ptr + row * D + offs_d, mask=mask_d & live, other=0.0).to(tl.float32) + bias)
        dt = tl.where(live, dt, 0.0)
        Ct = tl.load(c_ptr + row * N + offs_n).to(tl.float32)
        g = tl.load(gy_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            g = g * z * tl.sigmoid(z)
        lam = g[:, None] * Ct[None, :] + decay * lam
        decay = tl.exp(dt[:, None] * A)
    cell = offs_d[:, None] * N + offs_n[None, :]
    tl.store(out_ptr + (pid_b * n_ckpt + c) * D * N + cell, decay * lam, mask=mask_d[:, None])


@triton.jit
def _adjoint_combine(
    local_ptr, decay_ptr, gfinal_ptr, lam_in_ptr, dh0_ptr,
    D, n_ckpt,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_GFINAL: tl.constexpr,
):
    """Pass 2: the λ carried into each chunk's last step (exp(Δ_{t1} A) λ_{t1}, ∂L/∂final_state for the last
    chunk), chunk by chunk from the end: what leaves chunk c is its own part plus its whole decay times what
    came in. What leaves chunk 0 is ∂L/∂initial_state."""
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask = (offs_d < D)[:, None]
    cell = offs_d[:, None] * N + offs_n[None, :]
    if HAS_GFINAL:
        lam = tl.load(gfinal_ptr + pid_b * D * N + cell, mask=mask, other=0.0)
    else:
        lam = tl.zeros((BLOCK, N), dtype=tl.float32)
    for back in range(n_ckpt):
        at = (pid_b * n_ckpt + n_ckpt - 1 - back) * D * N + cell
        tl.store(lam_in_ptr + at, lam, mask=mask)
        lam = tl.load(local_ptr + at, mask=mask, other=0.0) + tl.load(decay_ptr + at, mask=mask, other=0.0) * lam
    tl.store(dh0_ptr + pid_b * D * N + cell, lam, mask=mask)


@triton.jit
def _scan_backward_chunks(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, ckpt_ptr, gy_ptr, lam_in_ptr,  # inputs
    scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,  # outputs
    T, D, n_ckpt, n_blocks, n_items,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr,
):
    """Pass 3: every (row, channel block, chunk) walked back independently from the λ pass 2 gave it. A
    persistent grid (programs take items in turn) bounds the scratch to one chunk per program, not the whole
    (b, t, d, n) state; ∂A, ∂D and ∂bias are written per (row, chunk) and summed by torch."""
    pid = tl.program_id(0)
    scratch = scratch_ptr + pid.to(tl.int64) * CKPT * BLOCK * N
    for item in range(pid, n_items, tl.num_programs(0)):
        pid_b = (item // (n_blocks * n_ckpt)).to(tl.int64)
        pid_d = (item // n_ckpt) % n_blocks
        c = item % n_ckpt
        offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
        cell = offs_d[:, None] * N + offs_n[None, :]
        at = (pid_b * n_ckpt + c) * D * N + cell
        lam = tl.load(lam_in_ptr + at, mask=mask_d[:, None], other=0.0)
        zero = tl.zeros((BLOCK, N), dtype=tl.float32)
        _, _, dA, dskip, dbias = _chunk_backward(
            u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, gy_ptr, ckpt_ptr, scratch, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr,
            pid_b, c, T, D, n_ckpt, (pid_b * n_blocks + pid_d) * T, tl.load(len_ptr + pid_b), offs_d, offs_n,
            mask_d, A, bias, skip, lam, zero + 1.0, zero, tl.zeros((BLOCK,), dtype=tl.float32),
            tl.zeros((BLOCK,), dtype=tl.float32),
            N, BLOCK, CKPT, HAS_Z)
        tl.store(dA_ptr + at, dA, mask=mask_d[:, None])
        tl.store(dD_ptr + (pid_b * n_ckpt + c) * D + offs_d, dskip, mask=mask_d)
        tl.store(dbias_ptr + (pid_b * n_ckpt + c) * D + offs_d, dbias, mask=mask_d)


def _lengths(lengths: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((b,), t, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32).clamp(0, t)


def chunked(b: int, d: int, device: torch.device) -> bool:
    """Whether a scan of ``b`` rows of ``d`` channels takes the chunked algorithm (`ALGORITHM`, module docstring)."""
    if ALGORITHM != "auto":
        return ALGORITHM == "chunked"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return b * triton.cdiv(d, BLOCK) < CHUNKED_BELOW_PROGRAMS_PER_SM * sms


def _forward_chunked(u, delta, A32, B, C, D, z, delta_bias, lens, h0, y, final) -> tuple[Tensor, Tensor]:
    """The inference scan's three passes (`sambay.ops.triton.selective_scan`) with CKPT-token chunks: their
    chunk-start states are the checkpoints; each chunk's total decay is kept for the backward's pass 2."""
    (b, t, d), n = u.shape, A32.shape[-1]
    h0 = torch.zeros(b, d, n, dtype=torch.float32, device=u.device) if h0 is None else h0
    zz = u if z is None else z
    args = (u, delta, A32, B, C, D, zz, delta_bias, lens, h0, y, final)
    strides = (t * d, d, t * d, d, t * n, n, t * n, n, t * d, d, t * d, d)  # every tensor contiguous
    return scan._launch_three_pass(args, strides, z is not None, chunk=CKPT, keep_states=True)


class _TrainableScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, lengths):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros to read
        b, t, d = u.shape
        n = A.shape[-1]
        u, delta, B, C = u.contiguous(), delta.contiguous(), B.contiguous(), C.contiguous()
        D, delta_bias = D.contiguous(), delta_bias.contiguous()
        z = None if z is None else z.contiguous()
        A32 = A.float().contiguous()
        h0 = None if initial_state is None else initial_state.float().contiguous()
        lens = _lengths(lengths, b, t, u.device)
        n_ckpt = max(triton.cdiv(t, CKPT), 1)
        y = torch.empty_like(u)
        final = torch.empty(b, d, n, dtype=torch.float32, device=u.device)
        if chunked(b, d, u.device):
            ckpt, decay = _forward_chunked(u, delta, A32, B, C, D, z, delta_bias, lens, h0, y, final)
        else:
            ckpt, decay = torch.empty(b, n_ckpt, d, n, dtype=torch.float32, device=u.device), None
            _scan_forward[(b, triton.cdiv(d, BLOCK))](
                u, delta, A32, B, C, D, u if z is None else z, delta_bias, final if h0 is None else h0, lens, y, ckpt,
                final, t, d, n_ckpt, N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None, HAS_H0=h0 is not None,
                num_warps=WARPS)
        ctx.save_for_backward(u, delta, A32, B, C, D, z, delta_bias, lens, ckpt, decay)
        ctx.meta = (A.dtype, initial_state is not None, None if initial_state is None else initial_state.dtype)
        return y, final

    @staticmethod
    def backward(ctx, g_y, g_final):
        u, delta, A32, B, C, D, z, delta_bias, lens, ckpt, decay = ctx.saved_tensors
        a_dtype, has_h0, h0_dtype = ctx.meta
        b, t, d = u.shape
        n = A32.shape[-1]
        n_ckpt, n_blocks = ckpt.shape[1], triton.cdiv(d, BLOCK)
        dev = u.device
        g_y = torch.zeros_like(u) if g_y is None else g_y.contiguous()
        g_final = None if g_final is None else g_final.float().contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        zz, dzz = (u, du) if z is None else (z, dz)
        f32 = {"dtype": torch.float32, "device": dev}
        dB_part, dC_part = torch.empty(b, n_blocks, t, n, **f32), torch.empty(b, n_blocks, t, n, **f32)
        dh0 = torch.empty(b, d, n, **f32)
        if decay is not None:  # the chunked algorithm: its three passes (module docstring)
            local, lam_in = torch.empty_like(ckpt), torch.empty_like(ckpt)
            _adjoint_local[(b, n_blocks, n_ckpt)](delta, A32, C, D, zz, delta_bias, lens, g_y, local, t, d, n_ckpt,
                                                  N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None, num_warps=WARPS)
            grid_c = triton.cdiv(d, scan.BLOCK_D)
            _adjoint_combine[(b, grid_c)](local, decay, dh0 if g_final is None else g_final, lam_in, dh0, d, n_ckpt,
                                          N=n, BLOCK=scan.BLOCK_D, HAS_GFINAL=g_final is not None, num_warps=2)
            del local
            items = b * n_blocks * n_ckpt
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
            programs = min(items, PERSISTENT_PROGRAMS_PER_SM * sms)
            scratch = torch.empty(programs * CKPT * BLOCK * n, **f32)
            dA_part, dD_part, dbias_part = torch.empty_like(ckpt), torch.empty(b, n_ckpt, d, **f32), torch.empty(
                b, n_ckpt, d, **f32)
            _scan_backward_chunks[(programs,)](
                u, delta, A32, B, C, D, zz, delta_bias, lens, ckpt, g_y, lam_in,
                scratch, du, ddelta, dzz, dB_part, dC_part, dA_part, dD_part, dbias_part,
                t, d, n_ckpt, n_blocks, items, N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None, num_warps=WARPS)
            dA_part, dD_part, dbias_part = dA_part.flatten(0, 1), dD_part.flatten(0, 1), dbias_part.flatten(0, 1)
        else:
            dA_part, dD_part, dbias_part = torch.empty(b, d, n, **f32), torch.empty(b, d, **f32), torch.empty(
                b, d, **f32)
            scratch = torch.empty(b * n_blocks * CKPT * BLOCK * n, **f32)
            _scan_backward[(b, n_blocks)](
                u, delta, A32, B, C, D, zz, delta_bias, lens, ckpt, g_y, dh0 if g_final is None else g_final,
                scratch, du, ddelta, dzz, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
                t, d, n_ckpt, n_blocks, N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None,
                HAS_GFINAL=g_final is not None, num_warps=WARPS)
        dB = dB_part.sum(1).to(B.dtype)
        dC = dC_part.sum(1).to(C.dtype)
        dA = dA_part.sum(0).to(a_dtype)
        dD = dD_part.sum(0).to(D.dtype)
        dbias = dbias_part.sum(0).to(delta_bias.dtype)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, dh0.to(h0_dtype) if has_h0 else None, None


def selective_scan_trainable(
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
    """The selective scan with a backward; see `selective_scan_ref` for arguments, shapes and returns. A d_state
    that is not a power of two (Triton's block shapes must be) runs the reference, which has autograd."""
    b, t, d = u.shape
    n = A.shape[-1]
    shapes = {"delta": (delta, (b, t, d)), "A": (A, (d, n)), "B": (B, (b, t, n)), "C": (C, (b, t, n)),
              "D": (D, (d,)), "delta_bias": (delta_bias, (d,)), "z": (z, (b, t, d)),
              "initial_state": (initial_state, (b, d, n)), "lengths": (lengths, (b,))}
    for name, (x, want) in shapes.items():
        if x is not None and tuple(x.shape) != want:
            raise ValueError(f"selective_scan_trainable: {name} has shape {tuple(x.shape)}, want {want}")
    if n & (n - 1):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths)
    return _TrainableScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, lengths)


__all__ = ["CKPT", "selective_scan_trainable"]
