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
    """How a checkpoint's projections are quantised: ``bits`` (8 or 4), inputs per scale, and whether each
    projection carries a per-input-channel ``input_scale`` (AWQ, `sambay.quant.awq`)."""

    bits: int
    group_size: int = 128
    input_scale: bool = False

    def __post_init__(self):
        check_quant_args(self.group_size, self.bits, self.group_size)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ bias) with W stored as int8 / packed int4 and fp32 group scales (buffers, not trained).

    With ``spec.input_scale`` (AWQ) W is stored as quantize(W diag(s)) and the fp32 ``input_scale`` buffer
    (n_in,) holds 1/s: y = (x diag(1/s)) Q(W diag(s))^T, exact up to the quantisation of W diag(s). The
    multiply is done here, not folded into the preceding op, because only some projections follow an op
    with a per-channel weight (a norm); see `sambay.quant.format`.
    """

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
        scale = torch.ones(n_in, dtype=torch.float32, device=device) if spec.input_scale else None
        self.register_buffer("input_scale", scale)  # (n_in,) fp32 1/s, or None (round-to-nearest)
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:  # fp32 multiply, one rounding back to x's dtype
            x = (x.float() * self.input_scale).to(x.dtype)
        y = self.ops.quantized_matmul(x, self.qweight, self.scales, self.bits, self.group_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        scaled = ", input_scale" if self.input_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}{scaled}"


def projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(module path, Linear) of every projection the table quantises, in model order."""
    found = []
    for path, owner in model.named_modules():
        for types, attributes in QUANTIZED_PROJECTIONS:
            if isinstance(owner, types):
                found += [(f"{path}.{a}", getattr(owner, a)) for a in attributes
                          if isinstance(getattr(owner, a, None), nn.Linear)]
    return found


def _replace(model: nn.Module, spec: QuantSpec, input_scales: dict[str, Tensor] | None,
             fill: bool) -> dict[str, QuantizedLinear]:
    chosen = projections(model)
    if not chosen:
        raise ValueError("the model has no float projections to quantise (is it quantised already?)")
    for path, linear in chosen:  # every layer is checked before any is replaced
        check_quant_args(linear.in_features, spec.bits, spec.group_size, path)
        if fill and spec.input_scale:
            _check_input_scale(input_scales.get(path), linear.in_features, path)
    layers = {}
    for path, linear in chosen:
        layer = QuantizedLinear(linear.in_features, linear.out_features, spec, model.ops, bias=linear.bias is not None,
                                dtype=linear.weight.dtype, device=linear.weight.device)
        if fill:
            with torch.no_grad():
                _fill(layer, linear, spec, input_scales[path] if spec.input_scale else None)
        parent, attribute = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attribute, layer)
        layers[path] = layer
    return layers


def _fill(layer: QuantizedLinear, linear: nn.Linear, spec: QuantSpec, s: Tensor | None) -> None:
    weight = linear.weight.float()  # (n_out, n_in)
    if s is not None:  # W diag(s) is quantised; x diag(1/s) undoes the scaling exactly
        weight = weight * s.to(weight.device, torch.float32)
        layer.input_scale = (1.0 / s.float()).to(weight.device)
    layer.qweight, layer.scales = quantize_rtn(weight, spec.bits, spec.group_size)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)


def _check_input_scale(s: Tensor | None, n_in: int, path: str) -> None:
    if s is None:
        raise ValueError(f"no input scale for {path}")
    if s.shape != (n_in,) or not bool((torch.isfinite(s) & (s > 0)).all()):
        raise ValueError(f"the input scale of {path} must be {n_in} finite positive values, got shape "
                         f"{list(s.shape)}")


def quantize_model(model: nn.Module, spec: QuantSpec,
                   input_scales: dict[str, Tensor] | None = None) -> dict[str, QuantizedLinear]:
    """Quantise ``model``'s big projections in place (round-to-nearest); returns {path: QuantizedLinear}.

    Args:
        model: a float SambaY.
        spec: bits, group size, and whether the projections carry an input scale.
        input_scales: with ``spec.input_scale`` only: {projection path: s (n_in,)}, the per-input-channel
            scales of `sambay.quant.awq.search_scales`; W diag(s) is quantised and 1/s stored.

    Raises:
        ValueError: ``spec.group_size`` does not divide some projection's inputs (named), nothing to quantise,
            or ``input_scales`` given without ``spec.input_scale`` (or missing, mis-shaped, not positive).
    """
    if (input_scales is not None) != spec.input_scale:
        raise ValueError("input_scales must be given exactly when spec.input_scale is set")
    return _replace(model, spec, input_scales, fill=True)


def apply_quantized_layers(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedLinear]:
    """Replace the projections by empty `QuantizedLinear`s on their device (``meta`` while loading)."""
    return _replace(model, spec, None, fill=False)
