"""Weight-only quantised matmul: round-to-nearest quantisation, (un)packing, and the reference GEMM.

Layout (our own; see the README's "Weight-only quantization" section for how it relates to GPTQ / AWQ):

    weight    (n_out, n_in) float          the Linear's weight, y = x W^T
    scales    (n_out, n_in // group_size)  fp32, one per output row and group of ``group_size`` inputs
    qweight   bits 8: (n_out, n_in)        int8, q in [-127, 127], w ≈ q * scale
              bits 4: (n_out, n_in // 2)   uint8, two weights a byte along the input dim: input 2j in the
                                           low nibble, 2j + 1 in the high nibble, each stored as q + 8
                                           (q in [-7, 7]; a fixed zero point of 8, no zero tensor)

Symmetric, per group: scale = max|w| over the group / qmax (qmax 127 or 7), q = round(w / scale). A group of
zeros gets scale 0 (q = 0). Scales stay fp32 whatever the activation dtype: at int8 a bf16 scale would add
up to a quarter of a quantisation step of error (127 * 2^-9), for 1/32 byte a weight at group 128.
"""

from __future__ import annotations

import torch
from torch import Tensor

BITS = (8, 4)
QMAX = {8: 127, 4: 7}


def check_quant_args(n_in: int, bits: int, group_size: int, what: str = "weight") -> None:
    """Raise ValueError unless ``bits`` and ``group_size`` can describe a weight with ``n_in`` inputs."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group size must be an even number >= 2, got {group_size}")
    if n_in % group_size:
        raise ValueError(f"group size {group_size} does not divide the {n_in} inputs of {what}")


def quantize_rtn(weight: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest symmetric quantisation of ``weight`` (n_out, n_in) → (qweight, scales); see the layout."""
    n_out, n_in = weight.shape
    check_quant_args(n_in, bits, group_size)
    w = weight.detach().float().reshape(n_out, n_in // group_size, group_size)  # (n_out, groups, group_size)
    scales = w.abs().amax(dim=-1) / QMAX[bits]  # (n_out, groups)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[..., None]).clamp_(-QMAX[bits], QMAX[bits]).reshape(n_out, n_in).to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scales


def pack_int4(q: Tensor) -> Tensor:
    """int8 (n_out, n_in) in [-8, 7] → uint8 (n_out, n_in // 2): input 2j low nibble, 2j + 1 high, each + 8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 (n_out, n_in // 2) → int8 (n_out, n_in); the inverse of `pack_int4`."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize_ref(qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """(qweight, scales) → the fp32 weight (n_out, n_in) they stand for: q * scale of q's group."""
    q = qweight if bits == 8 else unpack_int4(qweight)  # (n_out, n_in) int8
    n_out, n_in = q.shape
    w = q.float().reshape(n_out, n_in // group_size, group_size) * scales.float()[..., None]
    return w.reshape(n_out, n_in)


def quantized_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int) -> Tensor:
    """y = x W^T with W dequantised from (qweight, scales): dequantise, then one fp32 matmul.

    Args:
        x: (..., n_in) activations, any float dtype.
        qweight: int8 (n_out, n_in) at bits 8, uint8 (n_out, n_in // 2) at bits 4 (layout above).
        scales: fp32 (n_out, n_in // group_size).
        bits: 8 or 4.
        group_size: inputs per scale; divides n_in.

    Returns:
        (..., n_out) in x's dtype (fp32 math inside).
    """
    w = dequantize_ref(qweight, scales, bits, group_size)
    return (x.float() @ w.t()).to(x.dtype)
