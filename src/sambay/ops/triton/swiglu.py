"""Triton SwiGLU: silu(gate) ⊙ up in one pass (one read of each input, one write), fp32 math.

Same signature as `sambay.ops.swiglu.swiglu_ref`. Used by the MLP, the GMU and the memory Mamba,
where torch would launch two kernels and write an intermediate.

Row (batch) program ids are widened to int64 before they scale a stride: a 32K-token cache of 64 rows
holds more than 2^31 elements, and int32 offsets would wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu(g_ptr, u_ptr, o_ptr, n_cols, s_g, s_u, s_o, BLOCK_C: tl.constexpr):
    row, pid = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    g = tl.load(g_ptr + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * s_o + cols, (g * tl.sigmoid(g) * u).to(o_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up; see `swiglu_ref`. Inputs may be strided views (e.g. halves of one projection)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: shapes differ, {tuple(gate.shape)} vs {tuple(up.shape)}")
    n = gate.shape[-1]
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    out = torch.empty(g2.shape, dtype=up.dtype, device=up.device)
    if g2.shape[0]:
        _swiglu[(g2.shape[0], triton.cdiv(n, BLOCK))](g2, u2, out, n, g2.stride(0), u2.stride(0), out.stride(0),
                                                      BLOCK_C=BLOCK, num_warps=4)
    return out.view(up.shape)
