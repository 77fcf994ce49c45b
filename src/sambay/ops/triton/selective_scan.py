"""Triton Mamba-1 selective scan: prefill (three algorithms) and the single-step decode update.

Same signatures and semantics as `sambay.ops.selective_scan` (read its docstring for the math). Every
program keeps a (BLOCK_D, d_state) state in registers in fp32 and walks time sequentially; the
algorithms differ in how the parallelism rows × channel blocks (× chunks) is obtained.

``single_pass`` (one launch): each (row, channel block) runs the whole sequence from the start state,
writing y as it goes and the final state at the end. Every input is read once. It fills the GPU only
when rows × channel blocks is large (batched 2K-token prefill chunks), see SINGLE_PASS_MIN_PROGRAMS.

``lookback_rerun`` (one launch): the sequence is cut into CHUNK-token chunks and each (row, channel block,
chunk) is one program. Chunk ids are taken from an atomic ticket counter, so they follow the order in
which programs start and a program only ever waits on programs that already run (decoupled look-back; the
interpreter runs programs one by one in that same order). A program
  1. runs its chunk from h = 0, keeping the local end state h_loc and the chunk's summed Δ, S;
  2. waits for chunk c-1's published end state h_start (h0 for chunk 0), publishes its own,
     exp(A S) ⊙ h_start + h_loc, and the last chunk stores the final state;
  3. reruns its chunk from h_start (re-reads u, Δ, B; reads C, z once) and writes y, as the three-pass
     output kernel does, but without the two extra launches and state round trips. Per (token, channel),
     with bf16 inputs, it moves 12 bytes (u, Δ twice; z once; y), three_pass 12 plus its state round trips.
  A variant that corrected a stored fp32 local output by linearity instead of rerunning (18 bytes) was
  ahead only at 2 × 2K, by 1% over three_pass, and slower everywhere else on the H200 (below): removed.
  Published states live in a buffer filled with a NaN pattern (PENDING) that arithmetic never
  produces; each cell is written once with a relaxed atomic and polled with volatile loads, so no
  cross-thread fence is needed. A wait gives up after SPIN_LIMIT polls and lets NaN through, so a
  broken protocol shows up as NaN outputs instead of a hung GPU.

``three_pass`` (three launches, the first algorithm here): `_chunk_state` runs every chunk from
h = 0 and stores its end state and total decay; `_chunk_combine` turns those into the true state at
the start of every chunk; `_chunk_output` reruns every chunk from there and writes y. The recurrence
and the loads of u, Δ, B happen twice, and the chunk states go through memory three times.

Dispatch (`choose_algorithm`, for ``algorithm=AUTO``): a sequence of one chunk, or rows × channel
blocks >= SINGLE_PASS_MIN_PROGRAMS, runs ``single_pass``; otherwise CHUNKED_ALGORITHM. Measured on the
H200 (benchmarks/scan_prefill.py, d_inner 5120, bf16; docs/results/scan-prefill-h200.json), speed-up
over three_pass:

    | batch × tokens | single_pass | lookback_rerun | lookback (removed) |
    |----------------|-------------|----------------|--------------------|
    | 1 × 2K         | 0.35        | **1.61**       | 1.51               |
    | 1 × 32K        | 0.17        | **1.34**       | 1.25               |
    | 4 × 2K         | 0.73        | **1.27**       | 1.23               |
    | 8 × 2K         | **1.34**    | 1.34           | 1.34               |
    | 16 × 2K        | **2.17**    | 1.33           | 1.23               |
    | 64 × 2K        | **2.19**    | 1.31           | 1.21               |

(at 2 × 2K: 0.39 / 0.89 / 1.01, the one size where three_pass is ahead of lookback_rerun, by 12%).

The module is over the 400-line target because the three-pass path stays beside the one-launch ones: it is
the baseline benchmarks/scan_prefill.py measures them against, and forcing it (``algorithm=THREE_PASS``)
is the fallback should a GPU's scheduling ever starve the look-back's waits.

Row (batch) program ids are widened to int64 before they scale a stride: a 32K-token cache of 64 rows
holds more than 2^31 elements, and int32 offsets would wrap.
"""

from __future__ import annotations

from enum import Enum

import torch
import triton
import triton.language as tl
from torch import Tensor

# Tokens per chunk: 32K tokens give 128 chunks × 80 channel blocks at d_inner 5120, enough programs to
# fill 132 SMs at batch 1, while each program's sequential loop stays short.
CHUNK = 256
BLOCK_D = 64  # channels per program: 64 × d_state 16 fp32 state = 16 registers per thread at 2 warps
# single_pass gives each (row, channel block) one program for the whole sequence. An H200 has 132 SMs,
# and one program (2 warps) per SM leaves each step's load latency exposed; the chunked algorithms
# multiply the programs by the chunks instead. From 4 programs per SM on (batch >= 7 at d_inner 5120)
# the single pass wins, as it does half the work: measured on the H200, it ties lookback_rerun at batch 8
# and is 1.6x faster at 16 (module docstring).
SINGLE_PASS_MIN_PROGRAMS = 4 * 132
# A poll of a published state is one L2 round trip (~0.5-1 µs), and a legitimate wait spans at most the
# chunks resident at once (well under a millisecond): 2^20 polls is a >100× margin before giving up.
SPIN_LIMIT = tl.constexpr(1 << 20)
PENDING = tl.constexpr(0x7FBADBAD)  # a signalling-NaN bit pattern: not yet published (GPU math yields 0x7FFFFFFF)


class ScanAlgorithm(Enum):
    """Prefill algorithms of `selective_scan` (module docstring); AUTO applies `choose_algorithm`."""

    AUTO = "auto"
    SINGLE_PASS = "single_pass"
    LOOKBACK_RERUN = "lookback_rerun"
    THREE_PASS = "three_pass"


# The chunked algorithm AUTO uses below SINGLE_PASS_MIN_PROGRAMS: the same work as three_pass in one
# launch (module docstring); benchmarks/scan_prefill.py compares the algorithms.
CHUNKED_ALGORITHM = ScanAlgorithm.LOOKBACK_RERUN


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
def _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N: tl.constexpr, BLOCK: tl.constexpr):
    """A program's channels: (offs_d, offs_n, mask_d, A (BLOCK, N), bias, skip (BLOCK,)) in fp32."""
    offs_d = pid_d * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, N)
    mask_d = offs_d < D
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_d[:, None], other=0.0)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    skip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    return offs_d, offs_n, mask_d, A, bias, skip


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
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
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


@triton.jit
def _inputs(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, bias, t, T, n_valid, offs_d, offs_n, mask_d,
            s_ut, s_dtt, s_bt, s_ct, s_zt, LOAD_Z: tl.constexpr):
    """Step t's (u, Δ, B_t, C_t, z) in fp32. Past the row's valid length Δ = u = 0, so the state is
    frozen; past T nothing is read (z is u's placeholder when not LOAD_Z)."""
    inside = t < T
    live = inside & (t < n_valid)
    u = tl.load(u_ptr + t * s_ut + offs_d, mask=mask_d & live, other=0.0).to(tl.float32)
    dt = _softplus(tl.load(dt_ptr + t * s_dtt + offs_d, mask=mask_d & live, other=0.0).to(tl.float32) + bias)
    dt = tl.where(live, dt, 0.0)
    Bt = tl.load(b_ptr + t * s_bt + offs_n, mask=(offs_n >= 0) & live, other=0.0).to(tl.float32)
    Ct = tl.load(c_ptr + t * s_ct + offs_n, mask=(offs_n >= 0) & inside, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + t * s_zt + offs_d, mask=mask_d & inside, other=0.0).to(tl.float32) if LOAD_Z else u
    return u, dt, Bt, Ct, z


@triton.jit
def _scan_span(
    h, A, bias, skip, t0, n_steps, T, n_valid, offs_d, offs_n, mask_d,
    u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, y_ptr,  # pointers, already at this program's row
    s_ut, s_dtt, s_bt, s_ct, s_zt, s_yt,  # time strides
    WRITE_Y: tl.constexpr, GATE: tl.constexpr,
):
    """The recurrence over steps [t0, t0 + n_steps) from state h; writes y_t = h_t · C_t + D u_t (times
    silu(z_t) if GATE) when WRITE_Y. Step t+1's inputs are loaded before step t's math, so their
    latency overlaps it. Returns (h, S): the state after the span and its summed Δ per channel."""
    S = tl.zeros_like(bias)
    u, dt, Bt, Ct, z = _inputs(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, bias, t0, T, n_valid, offs_d, offs_n, mask_d,
                               s_ut, s_dtt, s_bt, s_ct, s_zt, GATE)
    for i in range(n_steps):
        t = t0 + i
        u1, dt1, B1, C1, z1 = _inputs(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, bias, t + 1, T, n_valid, offs_d, offs_n,
                                      mask_d, s_ut, s_dtt, s_bt, s_ct, s_zt, GATE)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        S += dt
        if WRITE_Y:
            y = tl.sum(h * Ct[None, :], axis=1) + skip * u
            if GATE:
                y = y * z * tl.sigmoid(z)
            tl.store(y_ptr + t * s_yt + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d & (t < T))
        u, dt, Bt, Ct, z = u1, dt1, B1, C1, z1
    return h, S


@triton.jit(do_not_specialize=["T"])  # one compilation for every length: the engine's chunks vary
def _single_pass(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, h0_ptr, y_ptr, hend_ptr,  # pointers
    T, D,  # dimensions
    s_ub, s_ut, s_dtb, s_dtt, s_bb, s_bt, s_cb, s_ct, s_zb, s_zt, s_yb, s_yt,  # strides
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_Z: tl.constexpr,  # meta-parameters
):
    pid_b, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, pid_d, D, N, BLOCK)
    cell = pid_b * D * N + offs_d[:, None] * N + offs_n[None, :]
    h = tl.load(h0_ptr + cell, mask=mask_d[:, None], other=0.0)
    h, _ = _scan_span(h, A, bias, skip, 0, T, T, tl.load(len_ptr + pid_b), offs_d, offs_n, mask_d,
                      u_ptr + pid_b * s_ub, dt_ptr + pid_b * s_dtb, b_ptr + pid_b * s_bb, c_ptr + pid_b * s_cb,
                      z_ptr + pid_b * s_zb, y_ptr + pid_b * s_yb, s_ut, s_dtt, s_bt, s_ct, s_zt, s_yt,
                      WRITE_Y=True, GATE=HAS_Z)
    tl.store(hend_ptr + cell, h, mask=mask_d[:, None])


@triton.jit
def _wait_published(ptr, mask):
    """Polls a published (BLOCK, N) state until no cell is PENDING, at most SPIN_LIMIT times; a cell
    still PENDING then reads as NaN (the pattern is a NaN), which propagates to the outputs."""
    bits = tl.load(ptr, mask=mask, other=0, volatile=True)
    polls = 0
    while (tl.max((bits == PENDING).to(tl.int32)) > 0) & (polls < SPIN_LIMIT):
        bits = tl.load(ptr, mask=mask, other=0, volatile=True)
        polls += 1
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["T", "n_rows", "n_chunks"])
def _lookback(
    u_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, D_ptr, z_ptr, bias_ptr, len_ptr, h0_ptr, y_ptr, hend_ptr,
    carry_ptr, ticket_ptr,  # pointers; carry: (b, n_chunks - 1, D, N) int32 bits of published states
    T, D, n_rows, n_chunks,  # dimensions
    s_ub, s_ut, s_dtb, s_dtt, s_bb, s_bt, s_cb, s_ct, s_zb, s_zt, s_yb, s_yt,  # strides
    N: tl.constexpr, BLOCK: tl.constexpr, CHUNK_T: tl.constexpr, HAS_Z: tl.constexpr,  # meta-parameters
):
    # Chunk-major ticket order: every program of chunk c-1 has started before any of chunk c.
    ticket = tl.atomic_add(ticket_ptr, 1)
    n_blocks = tl.cdiv(D, BLOCK)
    pid_c = ticket // (n_rows * n_blocks)
    pid_b = ((ticket // n_blocks) % n_rows).to(tl.int64)
    offs_d, offs_n, mask_d, A, bias, skip = _channels(A_ptr, D_ptr, bias_ptr, ticket % n_blocks, D, N, BLOCK)
    n_valid = tl.load(len_ptr + pid_b)
    u_ptr, dt_ptr, b_ptr = u_ptr + pid_b * s_ub, dt_ptr + pid_b * s_dtb, b_ptr + pid_b * s_bb
    c_ptr, z_ptr = c_ptr + pid_b * s_cb, z_ptr + pid_b * s_zb
    y_ptr = y_ptr + pid_b * s_yb
    t0 = pid_c * CHUNK_T
    h_loc, S = _scan_span(tl.zeros((BLOCK, N), dtype=tl.float32), A, bias, skip, t0, CHUNK_T, T, n_valid,
                          offs_d, offs_n, mask_d, u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, y_ptr,
                          s_ut, s_dtt, s_bt, s_ct, s_zt, s_yt, WRITE_Y=False, GATE=False)
    cell = offs_d[:, None] * N + offs_n[None, :]
    mask = mask_d[:, None]
    slot = carry_ptr + (pid_b * (n_chunks - 1) + pid_c) * D * N + cell  # this chunk's published end state
    if pid_c == 0:
        h_start = tl.load(h0_ptr + pid_b * D * N + cell, mask=mask, other=0.0)
    else:
        h_start = _wait_published(slot - D * N, mask)
    h_end = tl.exp(A * S[:, None]) * h_start + h_loc
    if pid_c == n_chunks - 1:
        tl.store(hend_ptr + pid_b * D * N + cell, h_end, mask=mask)
    else:
        tl.atomic_xchg(slot, h_end.to(tl.int32, bitcast=True), mask=mask, sem="relaxed")
    _scan_span(h_start, A, bias, skip, t0, CHUNK_T, T, n_valid, offs_d, offs_n, mask_d,
               u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, y_ptr, s_ut, s_dtt, s_bt, s_ct, s_zt, s_yt,
               WRITE_Y=True, GATE=HAS_Z)


def _check_last_dim(name: str, x: Tensor) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {x.stride()}")


def choose_algorithm(algorithm: ScanAlgorithm, rows: int, d_inner: int, t: int) -> ScanAlgorithm:
    """The prefill algorithm that runs for ``algorithm`` on (rows, t, d_inner); AUTO decides (module docstring)."""
    if algorithm is not ScanAlgorithm.AUTO:
        return algorithm
    if t <= CHUNK or rows * triton.cdiv(d_inner, BLOCK_D) >= SINGLE_PASS_MIN_PROGRAMS:
        return ScanAlgorithm.SINGLE_PASS
    return CHUNKED_ALGORITHM


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
    *,
    algorithm: ScanAlgorithm = ScanAlgorithm.AUTO,
) -> tuple[Tensor, Tensor]:
    """Triton selective scan; see `selective_scan_ref` for arguments, shapes and returns.

    ``algorithm`` (keyword only, not part of the reference signature) forces one of the prefill
    algorithms of the module docstring, for tests and benchmarks; AUTO applies `choose_algorithm`.
    """
    b, t, d = u.shape
    n = A.shape[-1]
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C)) + ((("z", z),) if z is not None else ()):
        _check_last_dim(name, x)
    if delta.shape != u.shape or B.shape != (b, t, n) or C.shape != (b, t, n) or A.shape != (d, n):
        raise ValueError("selective_scan: inconsistent shapes")
    dev = u.device
    lengths = torch.full((b,), t, dtype=torch.int32, device=dev) if lengths is None else lengths.to(torch.int32)
    h0 = torch.zeros(b, d, n, device=dev) if initial_state is None else initial_state.float().contiguous()
    y = torch.empty(b, t, d, device=dev, dtype=u.dtype)  # (b, t, d)
    h_end = torch.empty(b, d, n, device=dev)  # (b, d, n) fp32
    zz = z if z is not None else u  # a placeholder pointer when there is no gate (HAS_Z=False)
    args = (u, delta, A.float().contiguous(), B, C, D, zz, delta_bias, lengths, h0, y, h_end)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
               C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), y.stride(0), y.stride(1))
    match choose_algorithm(algorithm, b, d, t):
        case ScanAlgorithm.SINGLE_PASS:
            _single_pass[(b, triton.cdiv(d, BLOCK_D))](
                *args, t, d, *strides, N=n, BLOCK=BLOCK_D, HAS_Z=z is not None, num_warps=2
            )
        case ScanAlgorithm.LOOKBACK_RERUN:
            _launch_lookback(args, strides, z is not None)
        case ScanAlgorithm.THREE_PASS:
            _launch_three_pass(args, strides, z is not None)
    return y, h_end


def _launch_lookback(args: tuple, strides: tuple, has_z: bool) -> None:
    """One launch of `_lookback` over (chunks × rows × channel blocks) programs, chunk-major."""
    u = args[0]
    (b, t, d), n = u.shape, args[2].shape[-1]
    n_chunks = triton.cdiv(t, CHUNK)
    dev = u.device
    # (b, n_chunks - 1, d, n) published end states, all PENDING; one spare chunk keeps it non-empty.
    carry = torch.full((b, max(n_chunks - 1, 1), d, n), PENDING.value, dtype=torch.int32, device=dev)
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    grid = (n_chunks * b * triton.cdiv(d, BLOCK_D),)
    _lookback[grid](
        *args, carry, ticket,
        t, d, b, n_chunks, *strides,
        N=n, BLOCK=BLOCK_D, CHUNK_T=CHUNK, HAS_Z=has_z, num_warps=2,
    )


def _launch_three_pass(args: tuple, strides: tuple, has_z: bool, chunk: int = CHUNK,
                       keep_states: bool = False) -> tuple[Tensor, Tensor | None]:
    """`_chunk_state`, `_chunk_combine`, `_chunk_output` (module docstring) over ``chunk``-token chunks; one chunk
    skips the first two unless ``keep_states``. Returns (the chunk-start states (b, chunks, d, n), each chunk's
    total decay, same shape) when they were computed: the trainable scan keeps them as its checkpoints."""
    u, delta, A, B, C, D, zz, delta_bias, lengths, h0, y, h_end = args
    (b, t, d), n = u.shape, A.shape[-1]
    n_chunks = max(triton.cdiv(t, chunk), 1)
    grid_d = triton.cdiv(d, BLOCK_D)
    decay = None
    if n_chunks == 1 and not keep_states:
        h_start = h0
    else:
        h_loc = torch.empty(b, n_chunks, d, n, device=u.device)
        decay = torch.empty_like(h_loc)
        _chunk_state[(b, grid_d, n_chunks)](
            u, delta, A, B, delta_bias, lengths, h_loc, decay,
            t, d, n_chunks,
            *strides[:6],
            N=n, BLOCK=BLOCK_D, CHUNK_T=chunk, num_warps=2,
        )
        h_start = torch.empty_like(h_loc)
        _chunk_combine[(b, grid_d)](h_loc, decay, h0, h_start, d, n_chunks, N=n, BLOCK=BLOCK_D, num_warps=2)
    _chunk_output[(b, grid_d, n_chunks)](
        u, delta, A, B, C, D, zz, delta_bias, lengths, h_start, y, h_end,
        t, d, n_chunks,
        *strides,
        N=n, BLOCK=BLOCK_D, CHUNK_T=chunk, HAS_Z=has_z, num_warps=2,
    )
    return h_start, decay


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
