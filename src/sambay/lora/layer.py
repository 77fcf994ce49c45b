"""`LoRALinear`: a frozen Linear plus a low-rank update (Hu et al., arXiv 2106.09685, §4.1, eq. 3).

    y = base(x) + s · B (A x)        A: (r, in_features), B: (out_features, r), s = alpha / r

B starts at zero, so a fresh adapter leaves the model's outputs unchanged; A starts as PEFT's (and the
paper's reference code's) Kaiming-uniform. The wrapped module's own ``forward`` is kept, so a Linear
with special semantics (Mamba's `DeltaProjection`, whose bias the scan adds) gets the same update.

Adapters are stacked: ``lora_A`` is (n_adapters, r, in_features), ``lora_B`` (n_adapters, out_features, r)
and ``scaling`` (n_adapters,). Training, merging and ``sambay generate --lora`` use one adapter (slot 0).
The layout is the one a multi-adapter server needs (S-LoRA, arXiv 2311.03285; vLLM's punica kernels):
a per-row adapter index gathers each row's A and B (``lora_A[index]``), adapters of lower rank padded
with zeros up to r. That gathered path is engine-core work and not built here (see the package docstring).

Dtypes: A and B are created in fp32 for training (autocast runs the matmuls in bf16) or in the model
dtype for inference; the update is computed in their dtype and added in the base output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A Linear (frozen by the caller) plus ``n_adapters`` stacked low-rank updates; forward uses slot 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, n_adapters: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(n_adapters, rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, rank, device=device, dtype=dtype))
        # not persistent: set from the adapter's alpha / r whenever adapters are built or loaded
        self.register_buffer("scaling", torch.full((n_adapters,), alpha / rank, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform with a = sqrt(5) per adapter (PEFT's default), B: zeros."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on (r, in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def weight(self) -> Tensor:
        """The base weight (code that reads a Linear's weight, such as tensor parallelism, sees the base)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) → (..., out_features)."""
        y = self.base(x)
        delta = lora_delta(x, self.lora_A[0], self.lora_B[0], self.scaling[0])
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def merged_weight(self, slot: int = 0) -> Tensor:
        """W + s · B A of adapter ``slot``, computed in fp32 and rounded once to the base weight's dtype."""
        w = self.base.weight
        update = self.scaling[slot].float() * (self.lora_B[slot].float() @ self.lora_A[slot].float())
        return (w.float() + update).to(w.dtype)  # (out_features, in_features)


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor) -> Tensor:
    """s · B (A x) for one adapter, never forming B A.

    Args:
        x: (..., in_features).
        A: (r, in_features); B: (out_features, r); scaling: () tensor.

    Returns:
        (..., out_features) in A's dtype (under autocast, the autocast dtype).
    """
    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling.to(A.dtype)
