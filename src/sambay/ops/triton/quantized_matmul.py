"""Triton dequantising matmul: y = x W^T with W read as int8 / packed int4 and fp32 group scales.

Same signature and layout as `sambay.ops.quantized_matmul.quantized_matmul_ref`. One kernel serves decode
(the rows padded up to the smallest tl.dot tile; one int4 row takes the GEMV kernel below instead) and short
prefill chunks (GEMM): each program
owns a (BLOCK_M, BLOCK_N) tile of the output, walks its inputs BLOCK_K at a time, converts the weight tile
to the activations' dtype in registers and accumulates in fp32 with tl.dot. The weight is read from memory once,
as 1 or 1/2 byte an element: the point of weight-only quantisation at batch 1.

Layout in registers: weight tiles are loaded (BLOCK_N, BLOCK_K) along the stored rows, so each load is
contiguous, and fed to tl.dot transposed. An int4 tile is loaded as its bytes, (BLOCK_N, BLOCK_K / 2),
split into the low nibbles (even inputs) and the high nibbles (odd inputs), and multiplied by the even and
the odd columns of x in two dots: no per-nibble address arithmetic, which would defeat coalescing.

One int4 row (batch-1 decode: GEMV_ROWS, GEMV_FORMATS) whose scale group is a multiple of GEMV_BLOCK_K
takes `_quantized_gemv` instead: no tl.dot (whose smallest tile would pad the row to 16), the weights converted
to fp32 with the exponent trick (OR the integer into the mantissa of 2^23, subtract: integer and add units, no
conversion instructions) and multiplied into a (BLOCK_N, step) accumulator summed once at the end. `gemv` runs the same
kernel on a plain bf16 weight: on the H200 a step's projections, each weight streamed from HBM, take 1.95 ms
with it against cuBLAS's 2.07 (79% and 75% of the bandwidth limit; benchmarks/quant_gemv.py --cold).

Long prefills (at least DEQUANTIZE_ROWS rows) are compute-bound: there the weight is dequantised into a
temporary copy in the activations' dtype (one elementwise kernel, `_dequantize`) and multiplied by cuBLAS,
whose GEMM this untuned kernel does not match; the copy's traffic is small beside the matmul's work.

Scales: when a K step lies inside one scale group (``group_size`` a multiple of BLOCK_K, the usual 128),
the integer tile goes into tl.dot as is (int4 and int8 values are exact in bf16) and the (BLOCK_N,) scales
multiply the step's partial product, one multiply per output instead of one per weight. Otherwise every
weight is scaled before the dot.

Split-K for decode: a few rows give only ceil(N / BLOCK_N) output tiles, too few programs to keep the
H200's 132 SMs streaming weights (a 2560-output projection has 40). So the inputs are split into SPLIT
ranges, one program each; each writes its fp32 partial tile to a workspace and bumps the tile's counter,
and the program that arrives last sums the partials in split order (deterministic), writes the output
and resets the counter. One launch, no memset and no reduction kernel: inside a CUDA graph every extra
launch costs as much as a small projection. The workspace and counters are kept per (device, shape), so
a captured graph always finds the same buffers; the counters are zero between launches. They assume one
stream launches a shape at a time, as the engine does.

Row program ids are widened to int64 before they scale a stride, as in the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sambay.ops.quantized_matmul import check_quant_args

BLOCK_M_DECODE = 16  # the smallest tl.dot tile: decode's 1-16 rows are padded up to it
BLOCK_N_DECODE = 64  # output features a decode program
BLOCK_K_DECODE = 128  # inputs a decode step: one scale group of the default group size
BLOCK_M = 64  # prefill rows a program
BLOCK_N = 64  # output features a prefill program
BLOCK_K = 64  # inputs a prefill step
DEQUANTIZE_ROWS = 512  # from this many rows on, dequantise to a bf16 copy and let cuBLAS multiply (see above)
DECODE_WARPS, DECODE_STAGES = 4, 3  # launch options of the decode kernel (benchmarks/quant_gemv.py sweeps them)
MIN_PROGRAMS_PER_SM = 8  # decode splits K until about this many programs per SM stream the weights
MIN_SPLIT_STEPS = 4  # ... but each split walks at least this many BLOCK_K steps
GEMV_ROWS = 1  # a single row whose group is a multiple of GEMV_BLOCK_K takes the CUDA-core path (0: never) ...
GEMV_FORMATS = (4,)  # ... in these formats: on the H200, int4 1.61 ms a step against tl.dot's 3.09; int8 1.67 vs 1.60
GEMV_BLOCK_K = 128  # inputs a GEMV step
# bits → (output features a program, warps, programs per SM that split-K aims for); 16: `gemv`'s plain weight.
# The best of benchmarks/quant_gemv.py's sweep on the H200 (docs/results/quant-gemv-h200.json).
GEMV_TILES = {4: (64, 4, 16), 8: (32, 4, 4), 16: (32, 8, 4)}

_workspaces: dict[tuple, tuple[Tensor, Tensor]] = {}


@triton.jit
def _store_tile(acc, o_ptr, rm, rn, m_mask, n_mask, s_om, ws_ptr, count_ptr, tile, pid_k, bias_ptr,
                SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Writes a program's fp32 (BLOCK_M, BLOCK_N) tile (+ the bias of its outputs); under split-K, the last of
    the tile's programs sums the partials in split order and writes them (module docstring)."""
    out = o_ptr + rm[:, None] * s_om + rn[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    else:
        cell = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        base = ws_ptr + tile.to(tl.int64) * SPLIT * BLOCK_M * BLOCK_N
        tl.store(base + pid_k * BLOCK_M * BLOCK_N + cell, acc)
        tl.debug_barrier()  # every warp's part of the partial is stored before the counter moves
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")  # releases the partial stored above
        if arrived == SPLIT - 1:  # the last of the tile's programs: every partial is visible (acquire)
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in range(SPLIT):  # in split order, whatever order the programs finished in
                total += tl.load(base + j * BLOCK_M * BLOCK_N + cell, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
            tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch


@triton.jit
def _quantized_gemv(
    x_ptr, q_ptr, s_ptr, o_ptr, ws_ptr, count_ptr, bias_ptr,
    N, K, k_per_split,
    s_qn, s_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One row on CUDA cores (module docstring): no tl.dot and no padding to 16 rows; each weight is converted
    to fp32 by the exponent trick, multiplied by its input and scale into a (BLOCK_N, step) fp32 accumulator
    that is summed across once at the end. A K step lies inside one scale group. BITS 16: a plain weight."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    w_rows = q_ptr + rn[:, None].to(tl.int64) * s_qn
    WIDTH: tl.constexpr = BLOCK_K // 2 if BITS == 4 else BLOCK_K  # weight columns a step loads
    acc = tl.zeros((BLOCK_N, WIDTH), dtype=tl.float32)
    k_first = pid_k * k_per_split
    k_last = tl.minimum(k_first + k_per_split, K)
    for k0 in range(k_first, k_last, BLOCK_K):
        if BITS == 4:  # byte j: input 2j in the low nibble, 2j + 1 in the high one, each stored as q + 8
            rb = k0 // 2 + tl.arange(0, WIDTH)
            b_mask = rb < k_last // 2
            byte = tl.load(w_rows + rb[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0x88).to(tl.int32)
            lo = ((byte & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8 off: q exactly
            hi = ((byte >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            x_even = tl.load(x_ptr + 2 * rb, mask=b_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + 2 * rb + 1, mask=b_mask, other=0.0).to(tl.float32)
            prod = lo * x_even[None, :] + hi * x_odd[None, :]
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < k_last
            w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            if BITS == 8:  # 2^23 + (w + 128) as fp32 bits, minus 2^23 + 128: w exactly, integer and add units only
                wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            else:
                wf = w.to(tl.float32)
            prod = wf * tl.load(x_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if BITS == 16:
            acc += prod
        else:
            acc += prod * tl.load(s_ptr + rn.to(tl.int64) * s_sn + k0 // GROUP, mask=n_mask, other=0.0)[:, None]
    rm = tl.arange(0, 1)
    _store_tile(tl.sum(acc, axis=1)[None, :], o_ptr, rm, rn, rm < 1, n_mask, 0, ws_ptr, count_ptr, pid_n, pid_k,
                bias_ptr, SPLIT, 1, BLOCK_N, HAS_BIAS)


@triton.jit
def _quantized_matmul(
    # pointers
    x_ptr, q_ptr, s_ptr, o_ptr, ws_ptr, count_ptr,
    # dimensions
    M, N, K, k_per_split,
    # strides (the last dimension of each is contiguous)
    s_xm, s_qn, s_sn, s_om,
    # meta-parameters
    BITS: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    w_rows = q_ptr + rn[:, None].to(tl.int64) * s_qn  # (BLOCK_N, 1): the weight is read along its rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_k * k_per_split
    k_last = tl.minimum(k_first + k_per_split, K)
    for k0 in range(k_first, k_last, BLOCK_K):
        if BITS == 8:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_mask = rk < k_last
            x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)  # (BLOCK_N, BLOCK_K)
            if GROUP % BLOCK_K == 0:  # the step is inside one group: scale the step's product, not each weight
                s = tl.load(s_ptr + rn.to(tl.int64) * s_sn + k0 // GROUP, mask=n_mask, other=0.0)
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PREC) * s[None, :]
            else:
                s = tl.load(s_ptr + rn[:, None].to(tl.int64) * s_sn + (rk // GROUP)[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                acc += tl.dot(x, tl.trans((w.to(tl.float32) * s).to(x.dtype)), input_precision=PREC)
        else:  # byte j holds input 2j in its low nibble and 2j + 1 in its high one, each stored as q + 8
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            b_mask = rb < k_last // 2
            byte = tl.load(w_rows + rb[None, :], mask=n_mask[:, None] & b_mask[None, :], other=0x88).to(tl.int32)
            lo, hi = (byte & 0xF) - 8, (byte >> 4) - 8  # (BLOCK_N, BLOCK_K / 2) each: even and odd inputs
            xm = x_ptr + rm[:, None] * s_xm + 2 * rb[None, :]
            x_mask = m_mask[:, None] & b_mask[None, :]
            x_even = tl.load(xm, mask=x_mask, other=0.0)
            x_odd = tl.load(xm + 1, mask=x_mask, other=0.0)
            if GROUP % BLOCK_K == 0:
                s = tl.load(s_ptr + rn.to(tl.int64) * s_sn + k0 // GROUP, mask=n_mask, other=0.0)
                part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype)), input_precision=PREC)
                part = tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)), part, input_precision=PREC)
                acc += part * s[None, :]
            else:  # inputs 2j and 2j + 1 share a group (the group size is even)
                s = tl.load(s_ptr + rn[:, None].to(tl.int64) * s_sn + (2 * rb // GROUP)[None, :],
                            mask=n_mask[:, None] & b_mask[None, :], other=0.0)
                acc = tl.dot(x_even, tl.trans((lo.to(tl.float32) * s).to(x_even.dtype)), acc, input_precision=PREC)
                acc = tl.dot(x_odd, tl.trans((hi.to(tl.float32) * s).to(x_odd.dtype)), acc, input_precision=PREC)
    _store_tile(acc, o_ptr, rm, rn, m_mask, n_mask, s_om, ws_ptr, count_ptr, pid_m * tl.num_programs(1) + pid_n, pid_k,
                o_ptr, SPLIT, BLOCK_M, BLOCK_N, False)


@triton.jit
def _dequantize(q_ptr, s_ptr, w_ptr, N, K, s_qn, s_sn, s_wn,
                BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = q[n, k] * scale[n, k // GROUP], in W's dtype: the weight a large prefill multiplies by."""
    rn = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    if BITS == 8:
        q = tl.load(q_ptr + rn[:, None] * s_qn + rk[None, :], mask=mask, other=0).to(tl.float32)
    else:
        byte = tl.load(q_ptr + rn[:, None] * s_qn + (rk // 2)[None, :], mask=mask, other=0x88).to(tl.int32)
        q = ((byte >> ((rk % 2) * 4)[None, :]) & 0xF).to(tl.float32) - 8.0
    s = tl.load(s_ptr + rn[:, None] * s_sn + (rk // GROUP)[None, :], mask=mask, other=0.0)
    tl.store(w_ptr + rn[:, None] * s_wn + rk[None, :], (q * s).to(w_ptr.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split(tiles: int, n_in: int, block_k: int, device: torch.device, per_sm: int | None = None) -> int:
    """Input ranges per output tile: about ``per_sm`` (default MIN_PROGRAMS_PER_SM) programs for every SM,
    never a range under MIN_SPLIT_STEPS steps."""
    split = 1
    while (tiles * split < (per_sm or MIN_PROGRAMS_PER_SM) * _sm_count(device)
           and n_in // (2 * split) >= MIN_SPLIT_STEPS * block_k):
        split *= 2
    return split


def _workspace(device: torch.device, tiles: int, split: int, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Partials and counters of one launch shape. Shared by every launch of that shape, which is safe because
    they run one after another on one stream (the engine's, and its graphs' replays on it); two streams
    launching the same shape at once would mix their partials."""
    key = (device, tiles, split, block_m, block_n)
    if key not in _workspaces:
        _workspaces[key] = (torch.empty(tiles * split * block_m * block_n, dtype=torch.float32, device=device),
                            torch.zeros(tiles, dtype=torch.int32, device=device))
    return _workspaces[key]


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T (+ bias) for one row and a plain (n_out, n_in) weight, on the GEMV path (split-K with the
    fix-up, no cuBLAS reduction kernel, the bias added in the store); `sambay.model.gemv` uses it for decode
    and benchmarks/quant_gemv.py compares it with cuBLAS."""
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in).contiguous()
    m = x2.shape[0]
    if m != 1 or x.shape[-1] != n_in:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be one row of {n_in} inputs")
    weight = weight.contiguous()
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} does not fit {n_out} outputs")
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    _launch_gemv(x2, weight, weight, out, 16, 1, bias)
    return out.view(*x.shape[:-1], n_out)


def _launch_gemv(x2: Tensor, weight: Tensor, scales: Tensor, out: Tensor, bits: int, group_size: int,
                 bias: Tensor | None = None) -> None:
    n_in, n_out = x2.shape[1], out.shape[1]
    block_n, warps, per_sm = GEMV_TILES[bits]
    tiles = triton.cdiv(n_out, block_n)
    split = _split(tiles, n_in, GEMV_BLOCK_K, x2.device, per_sm)
    k_per_split = triton.cdiv(triton.cdiv(n_in, split), GEMV_BLOCK_K) * GEMV_BLOCK_K
    split = triton.cdiv(n_in, k_per_split)  # no empty range at the end
    workspace, counts = _workspace(x2.device, tiles, split, 1, block_n) if split > 1 else (out, out)
    _quantized_gemv[(tiles, split)](
        x2, weight, scales, out, workspace, counts, out if bias is None else bias.contiguous(), n_out, n_in,
        k_per_split, weight.stride(0), scales.stride(0), BITS=bits, GROUP=group_size, SPLIT=split, BLOCK_N=block_n,
        BLOCK_K=GEMV_BLOCK_K, HAS_BIAS=bias is not None, num_warps=warps)


def quantized_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """y = x W^T, W dequantised on the fly from (qweight, scales); see `quantized_matmul_ref`."""
    n_out, n_in = scales.shape[0], x.shape[-1]
    check_quant_args(n_in, bits, group_size, "x")
    want_q = (n_out, n_in if bits == 8 else n_in // 2)
    if tuple(qweight.shape) != want_q or qweight.dtype != (torch.int8 if bits == 8 else torch.uint8):
        raise ValueError(f"quantized_matmul: qweight {qweight.dtype} {tuple(qweight.shape)} does not fit x with "
                         f"{n_in} inputs at {bits} bits (want {want_q})")
    if tuple(scales.shape) != (n_out, n_in // group_size) or scales.dtype != torch.float32:
        raise ValueError(f"quantized_matmul: scales {scales.dtype} {tuple(scales.shape)}, want float32 "
                         f"{(n_out, n_in // group_size)}")
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n_out)
    if m >= DEQUANTIZE_ROWS:  # a long prefill: compute-bound, so the matmul is cuBLAS's on a dequantised copy
        w = torch.empty((n_out, n_in), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(n_out, BLOCK_N), triton.cdiv(n_in, BLOCK_K))
        _dequantize[grid](qweight, scales, w, n_out, n_in, qweight.stride(0), scales.stride(0), w.stride(0),
                          BITS=bits, GROUP=group_size, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        return torch.matmul(x2, w.t(), out=out).view(*x.shape[:-1], n_out)
    if m <= GEMV_ROWS and bits in GEMV_FORMATS and group_size % GEMV_BLOCK_K == 0:
        _launch_gemv(x2, qweight, scales, out, bits, group_size)
        return out.view(*x.shape[:-1], n_out)
    if m <= BLOCK_M_DECODE:
        block_m, block_n, block_k = BLOCK_M_DECODE, BLOCK_N_DECODE, BLOCK_K_DECODE
    else:
        block_m, block_n, block_k = BLOCK_M, BLOCK_N, BLOCK_K
    grid_m, grid_n = triton.cdiv(m, block_m), triton.cdiv(n_out, block_n)
    split = _split(grid_m * grid_n, n_in, block_k, x.device) if m <= BLOCK_M_DECODE else 1
    k_per_split = triton.cdiv(triton.cdiv(n_in, split), block_k) * block_k
    split = triton.cdiv(n_in, k_per_split)  # no empty range at the end
    workspace, counts = (_workspace(x.device, grid_m * grid_n, split, block_m, block_n) if split > 1
                         else (out, out))  # unused without a split
    _quantized_matmul[(grid_m, grid_n, split)](
        x2, qweight, scales, out, workspace, counts, m, n_out, n_in, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP=group_size, PREC="ieee" if x.dtype == torch.float32 else "tf32", SPLIT=split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **({"num_warps": DECODE_WARPS, "num_stages": DECODE_STAGES} if m <= BLOCK_M_DECODE else {}),
    )
    return out.view(*x.shape[:-1], n_out)
