"""Residual add + LayerNorm, the seam between every SambaY sub-layer (spec §3.3-3.4).

    x_new = x + delta                              x: fp32 residual stream, delta: a branch output
    h     = LayerNorm(round(x_new, weight.dtype))  fp32 statistics, one rounding of h to weight.dtype

The reference rounds the fp32 residual to the model dtype before every norm, so this does too.
Fusing the add, the rounding and the norm into one op halves the launches around each norm and
reads the residual once.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def add_layer_norm_ref(
    x: Tensor, delta: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(x + delta, LayerNorm(x + delta)).

    Args:
        x: (..., d) fp32 residual stream.
        delta: (..., d) branch output in any float dtype, or None (nothing to add).
        weight, bias: (d,) LayerNorm affine parameters; weight.dtype is the output dtype of h.
        eps: LayerNorm epsilon.

    Returns:
        x_new: (..., d) fp32; h: (..., d) in weight.dtype.
    """
    x_new = x if delta is None else x + delta
    rounded = x_new.to(weight.dtype).float()
    h = F.layer_norm(rounded, (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return x_new, h.to(weight.dtype)
