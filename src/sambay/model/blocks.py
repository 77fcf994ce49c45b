"""The residual block shared by every layer kind, and the factory that picks its mixer from the plan.

    x ← x + mixer(norm1(x))        norm: LayerNorm with bias (spec §3.3)
    x ← x + mlp(norm2(x))          SwiGLU MLP

Dtype policy (spec §3.4): the residual stream x is fp32; each norm reads it rounded to the model dtype,
and each branch output (model dtype) is added in fp32.
"""

from __future__ import annotations

from torch import Tensor, nn

from sambay.config import LayerKind, SambaYConfig
from sambay.model.attention import CrossAttention, FullAttention, SlidingWindowAttention
from sambay.model.gmu import GatedMemoryUnit
from sambay.model.mamba import Mamba, MemoryMamba
from sambay.model.mlp import SwiGLUMLP
from sambay.ops import Ops


class Block(nn.Module):
    """Pre-norm residual block: mixer then MLP. The mixer returns (output, aux); aux is passed on."""

    def __init__(self, mixer: nn.Module, config: SambaYConfig, ops: Ops):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)  # parameters; the op applies them
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLUMLP(config.d_model, config.d_ff, ops)
        self.eps, self.ops = config.norm_eps, ops

    def forward(self, x: Tensor, *context) -> tuple[Tensor, object]:
        """x: (b, t, d_model) fp32 residual; ``context`` is what this block's mixer reads (span, cache, …)."""
        _, h = self.ops.add_layer_norm(x, None, self.norm1.weight, self.norm1.bias, self.eps)
        out, aux = self.mixer(h, *context)
        x, h = self.ops.add_layer_norm(x, out, self.norm2.weight, self.norm2.bias, self.eps)
        return x + self.mlp(h), aux  # a model-dtype branch added into the fp32 stream


def build_mixer(config: SambaYConfig, layer_index: int, ops: Ops) -> nn.Module:
    """The mixer of layer ``layer_index``, from its kind in the plan."""
    match config.plan[layer_index]:
        case LayerKind.MAMBA:
            return (MemoryMamba if layer_index == config.memory_layer else Mamba)(config, ops)
        case LayerKind.SLIDING_ATTENTION:
            return SlidingWindowAttention(config, layer_index, ops)
        case LayerKind.FULL_ATTENTION:
            return FullAttention(config, layer_index, ops)
        case LayerKind.GMU:
            return GatedMemoryUnit(config.d_model, config.d_inner, ops)
        case LayerKind.CROSS_ATTENTION:
            return CrossAttention(config, layer_index, ops)
    raise AssertionError(f"unhandled layer kind {config.plan[layer_index]}")
