"""Triton dequantising matmul: y = x W^T with W read as int8 / packed int4 and fp32 group scales.

Same signature and layout as `sambay.ops.quantized_matmul.quantized_matmul_ref`. One kernel serves decode
(GEMV: the rows are padded up to the smallest tl.dot tile) and prefill (GEMM): each program owns a
(BLOCK_M, BLOCK_N) tile of the output, walks the inputs BLOCK_K at a time, dequantises the weight tile in
registers (q * scale, then the activations' dtype) and accumulates in fp32 with tl.dot. The weight is read
from memory once, as 1 or 1/2 byte an element: the point of weight-only quantisation at batch 1.

Not tuned: the block sizes are a first choice, not measured on the H200 (issue 14 leaves that open).
Row program ids are widened to int64 before they scale a stride, as in the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sambay.ops.quantized_matmul import check_quant_args

BLOCK_M_DECODE = 16  # the smallest tl.dot tile: decode's 1-8 rows are padded up to it
BLOCK_M = 64  # prefill rows a program
BLOCK_N = 64  # output features a program
BLOCK_K = 64  # inputs a step; any size works (each input column looks up its own group's scale)


@triton.jit
def _quantized_matmul(
    # pointers
    x_ptr, q_ptr, s_ptr, o_ptr,
    # dimensions
    M, N, K,
    # strides (the last dimension of each is contiguous)
    s_xm, s_qn, s_sn, s_om,
    # meta-parameters
    BITS: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]  # (BLOCK_K, BLOCK_N): the weight tile, transposed
        if BITS == 8:
            q = tl.load(q_ptr + rn[None, :].to(tl.int64) * s_qn + rk[:, None], mask=w_mask, other=0).to(tl.float32)
        else:  # input 2j in the low nibble of byte j, 2j + 1 in the high one, each stored as q + 8
            byte = tl.load(q_ptr + rn[None, :].to(tl.int64) * s_qn + (rk // 2)[:, None], mask=w_mask, other=8)
            q = ((byte.to(tl.int32) >> ((rk % 2) * 4)[:, None]) & 0xF).to(tl.float32) - 8.0
        s = tl.load(s_ptr + rn[None, :].to(tl.int64) * s_sn + (rk // GROUP)[:, None], mask=w_mask, other=0.0)
        acc += tl.dot(x, (q * s).to(x.dtype), input_precision=PREC)
    out = o_ptr + rm[:, None] * s_om + rn[None, :]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


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
    if m:
        block_m = BLOCK_M_DECODE if m <= BLOCK_M_DECODE else BLOCK_M
        grid = (triton.cdiv(m, block_m), triton.cdiv(n_out, BLOCK_N))
        _quantized_matmul[grid](
            x2, qweight, scales, out, m, n_out, n_in,
            x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
            BITS=bits, GROUP=group_size, PREC="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    return out.view(*x.shape[:-1], n_out)
