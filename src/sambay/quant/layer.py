"""`QuantizedLinear`, which projections are quantised, and applying it to an unmodified SambaY.

Quantised (the big projections, ~all of the weights a decode step reads besides the embedding):

    owner                      projections
    attention (all three)      qkv / q_proj, out_proj
    Mamba (and MemoryMamba)    in_proj, out_proj
    GatedMemoryUnit            in_proj, out_proj
    SwiGLUMLP                  in_proj, out_proj

Kept in the model dtype: Mamba's x_proj and dt_proj (small, and they produce Δ, B, C, which the recurrence
amplifies over many steps), every norm, the conv, A_log, D, the λ vectors, the embedding and the LM head (tied
to the embedding in the release; an untied head is kept in float too: it is one layer and sets the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sambay.model.attention import CrossAttention, FullAttention, SlidingWindowAttention
from sambay.model.gmu import GatedMemoryUnit
from sambay.model.mamba import Mamba
from sambay.model.mlp import SwiGLUMLP
from sambay.ops import Ops
from sambay.ops.quantized_matmul import check_quant_args, quantize_rtn

QUANT_FILE = "quantization_config.json"
# owner module types → the attribute names of the projections that are quantised
QUANTIZED_PROJECTIONS: tuple[tuple[tuple[type, ...], tuple[str, ...]], ...] = (
    ((SlidingWindowAttention, FullAttention, CrossAttention), ("qkv", "q_proj", "out_proj")),
    ((Mamba, GatedMemoryUnit, SwiGLUMLP), ("in_proj", "out_proj")),
)


@dataclass(frozen=True)
class QuantSpec:
    """How a checkpoint's projections are quantised: ``bits`` (8 or 4) and inputs per scale."""

    bits: int
    group_size: int = 128

    def __post_init__(self):
        check_quant_args(self.group_size, self.bits, self.group_size)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ bias) with W stored as int8 / packed int4 and fp32 group scales (buffers, not trained)."""

    def __init__(self, n_in: int, n_out: int, spec: QuantSpec, ops: Ops, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        check_quant_args(n_in, spec.bits, spec.group_size)
        self.in_features, self.out_features, self.bits, self.group_size = n_in, n_out, spec.bits, spec.group_size
        self.ops = ops
        q_shape, q_dtype = ((n_out, n_in), torch.int8) if spec.bits == 8 else ((n_out, n_in // 2), torch.uint8)
        self.register_buffer("qweight", torch.zeros(q_shape, dtype=q_dtype, device=device))
        self.register_buffer("scales", torch.zeros(n_out, n_in // spec.group_size, dtype=torch.float32,
                                                   device=device))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.ops.quantized_matmul(x, self.qweight, self.scales, self.bits, self.group_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(module path, Linear) of every projection the table quantises, in model order."""
    found = []
    for path, owner in model.named_modules():
        for types, attributes in QUANTIZED_PROJECTIONS:
            if isinstance(owner, types):
                found += [(f"{path}.{a}", getattr(owner, a)) for a in attributes
                          if isinstance(getattr(owner, a, None), nn.Linear)]
    return found


def _replace(model: nn.Module, spec: QuantSpec, fill: bool) -> dict[str, QuantizedLinear]:
    chosen = projections(model)
    if not chosen:
        raise ValueError("the model has no float projections to quantise (is it quantised already?)")
    for path, linear in chosen:  # every layer is checked before any is replaced
        check_quant_args(linear.in_features, spec.bits, spec.group_size, path)
    layers = {}
    for path, linear in chosen:
        layer = QuantizedLinear(linear.in_features, linear.out_features, spec, model.ops, bias=linear.bias is not None,
                                dtype=linear.weight.dtype, device=linear.weight.device)
        if fill:
            with torch.no_grad():
                layer.qweight, layer.scales = quantize_rtn(linear.weight, spec.bits, spec.group_size)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        parent, attribute = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attribute, layer)
        layers[path] = layer
    return layers


def quantize_model(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedLinear]:
    """Quantise ``model``'s big projections in place (round-to-nearest); returns {path: QuantizedLinear}.

    Raises:
        ValueError: ``spec.group_size`` does not divide some projection's inputs (named), or nothing to quantise.
    """
    return _replace(model, spec, fill=True)


def apply_quantized_layers(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedLinear]:
    """Replace the projections by empty `QuantizedLinear`s on their device (``meta`` while loading)."""
    return _replace(model, spec, fill=False)
