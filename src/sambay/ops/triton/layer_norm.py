"""Triton residual add + LayerNorm in one pass: one program per row, the row held in registers.

Same signature as `sambay.ops.layer_norm.add_layer_norm_ref`: reads x (fp32) and delta once, writes the
new residual and the normalised row once; statistics in fp32 after rounding to the model dtype, as the
reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _add_layer_norm(
    x_ptr, d_ptr, w_ptr, b_ptr, xo_ptr, h_ptr,  # pointers
    D, eps,  # dimensions and scalars
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,  # meta-parameters
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x = x + tl.load(d_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(xo_ptr + row * D + cols, x, mask=mask)
    v = x.to(h_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds the residual before the norm
    mean = tl.sum(v, 0) / D
    centred = tl.where(mask, v - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, 0) / D + eps)
    h = centred * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(
    x: Tensor, delta: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """Triton add + LayerNorm; see `add_layer_norm_ref`."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    d2 = None if delta is None else delta.reshape(-1, d).contiguous()
    x_new = x2 if d2 is None else torch.empty_like(x2)
    h = torch.empty(x2.shape, dtype=weight.dtype, device=x.device)
    if x2.shape[0]:
        _add_layer_norm[(x2.shape[0],)](
            x2, d2 if d2 is not None else x2, weight, bias if bias is not None else weight, x_new, h,
            d, eps, HAS_DELTA=d2 is not None, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(d),
            num_warps=8 if d >= 2048 else 4,
        )
    return x_new.view(x.shape), h.view(x.shape)
