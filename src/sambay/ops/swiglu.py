"""SwiGLU gating, silu(gate) ⊙ up (Shazeer, arXiv 2002.05202), used by the MLP, the GMU and the memory Mamba.

The reference evaluates it in fp32 and rounds once to the dtype of ``up``, as the release's fused
`swiglu` does (spec §3.5).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def swiglu_ref(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up. gate, up: (..., d) of equal shape. Returns (..., d) in ``up.dtype``."""
    return (F.silu(gate.float()) * up.float()).to(up.dtype)
