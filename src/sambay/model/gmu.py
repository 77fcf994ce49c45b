"""Gated Memory Unit (SambaY paper, arXiv 2507.06607, §3.1, eq. 4).

    y = W_out (memory ⊙ silu(W_in x))

``memory`` is the ungated SSM readout of the last self-decoder Mamba layer for the same positions
(spec §3.8). The GMU has no state of its own, so the cross-decoder caches nothing for it: it re-reads a
token's memory, which costs O(d_inner) per token instead of attention's O(context).
"""

from __future__ import annotations

from torch import Tensor, nn

from sambay.model.span import Span
from sambay.ops import Ops


class GatedMemoryUnit(nn.Module):
    """Element-wise, SiLU-gated read of the shared Mamba memory."""

    def __init__(self, d_model: int, d_inner: int, ops: Ops):
        super().__init__()
        self.in_proj = nn.Linear(d_model, d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.ops = ops

    def forward(self, x: Tensor, span: Span, memory: Tensor, shared=None) -> tuple[Tensor, None]:
        """x: (b, t, d_model); memory: (b, t, d_inner). Returns ((b, t, d_model), None)."""
        return self.out_proj(self.ops.swiglu(self.in_proj(x), memory)), None
