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

Parallelism is rows × channel blocks (BLOCK channels each): 320 programs per row at d_inner 5120 with
BLOCK 16. Each program's loop is sequential in time, so at a batch of one row this is latency-bound; the
chunked look-back of the inference scan is the known next step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sambay.ops.selective_scan import selective_scan_ref
from sambay.ops.triton.selective_scan import _channels, _softplus

CKPT = 64  # tokens between saved states: the backward's recompute window (its scratch holds CKPT states)
BLOCK = 16  # channels per program: (16, d_state 16) fp32 state and adjoint in registers
WARPS = 4  # warps per program of both kernels (benchmarks/scan_train.py --sweep times BLOCK x WARPS)


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
def _scan_backward(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, ckpt_ptr, gy_ptr, gfinal_ptr,  # inputs
    scratch_ptr, du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,  # outputs
    T, D, n_ckpt, n_blocks,
    N: tl.constexpr, BLOCK: tl.constexpr, CKPT: tl.constexpr, HAS_Z: tl.constexpr, HAS_GFINAL: tl.constexpr,
):
    """The adjoint walk of one (row, channel block), last chunk first (module docstring)."""
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
    cell = offs_d[:, None] * N + offs_n[None, :]
    local = tl.arange(0, BLOCK)[:, None] * N + offs_n[None, :]  # a state's place in the scratch
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
        c = n_ckpt - 1 - back
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
    tl.store(dh0_ptr + pid_b * D * N + cell, decay * lam, mask=mask_d[:, None])
    tl.store(dA_ptr + pid_b * D * N + cell, dA, mask=mask_d[:, None])
    tl.store(dD_ptr + pid_b * D + offs_d, dskip, mask=mask_d)
    tl.store(dbias_ptr + pid_b * D + offs_d, dbias, mask=mask_d)


def _lengths(lengths: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    if lengths is None:
        return torch.full((b,), t, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32).clamp(0, t)


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
        ckpt = torch.empty(b, n_ckpt, d, n, dtype=torch.float32, device=u.device)
        final = torch.empty(b, d, n, dtype=torch.float32, device=u.device)
        grid = (b, triton.cdiv(d, BLOCK))
        _scan_forward[grid](u, delta, A32, B, C, D, u if z is None else z, delta_bias, final if h0 is None else h0,
                            lens, y, ckpt, final, t, d, n_ckpt, N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None,
                            HAS_H0=h0 is not None, num_warps=WARPS)
        ctx.save_for_backward(u, delta, A32, B, C, D, z, delta_bias, lens, ckpt)
        ctx.meta = (A.dtype, initial_state is not None, None if initial_state is None else initial_state.dtype)
        return y, final

    @staticmethod
    def backward(ctx, g_y, g_final):
        u, delta, A32, B, C, D, z, delta_bias, lens, ckpt = ctx.saved_tensors
        a_dtype, has_h0, h0_dtype = ctx.meta
        b, t, d = u.shape
        n = A32.shape[-1]
        n_ckpt, n_blocks = ckpt.shape[1], triton.cdiv(d, BLOCK)
        dev = u.device
        g_y = torch.zeros_like(u) if g_y is None else g_y.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        f32 = {"dtype": torch.float32, "device": dev}
        dB_part, dC_part = torch.empty(b, n_blocks, t, n, **f32), torch.empty(b, n_blocks, t, n, **f32)
        dA_part, dh0 = torch.empty(b, d, n, **f32), torch.empty(b, d, n, **f32)
        dD_part, dbias_part = torch.empty(b, d, **f32), torch.empty(b, d, **f32)
        scratch = torch.empty(b * n_blocks * CKPT * BLOCK * n, **f32)
        _scan_backward[(b, n_blocks)](
            u, delta, A32, B, C, D, u if z is None else z, delta_bias, lens, ckpt, g_y,
            dh0 if g_final is None else g_final.float().contiguous(),
            scratch, du, ddelta, du if dz is None else dz, dB_part, dC_part, dA_part, dD_part, dbias_part, dh0,
            t, d, n_ckpt, n_blocks, N=n, BLOCK=BLOCK, CKPT=CKPT, HAS_Z=z is not None, HAS_GFINAL=g_final is not None,
            num_warps=WARPS)
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
