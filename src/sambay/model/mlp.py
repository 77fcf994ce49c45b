"""SwiGLU MLP of every SambaY block (spec §3.5): one fused input projection whose FIRST half is the gate."""

from __future__ import annotations

from torch import Tensor, nn

from sambay.ops import Ops


class SwiGLUMLP(nn.Module):
    """out_proj(silu(gate) ⊙ up) with [gate | up] = in_proj(x); no biases."""

    def __init__(self, d_model: int, d_ff: int, ops: Ops):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.out_proj = nn.Linear(d_ff, d_model, bias=False)
        self.ops = ops

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.in_proj(x).chunk(2, dim=-1)  # (b, t, d_ff) each
        return self.out_proj(self.ops.swiglu(gate, up))
