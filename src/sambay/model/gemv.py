"""Batch-1 decode projections on our Triton GEMV kernel instead of cuBLAS (`use_gemv`).

At one row, cuBLAS streams a step's projections of the release (each weight from HBM) at 75% of the H200's
bandwidth limit (2.07 ms), partly in split-K GEMMs with a separate reduction kernel each;
`sambay.ops.triton.quantized_matmul.gemv` does the same work at 79% (1.95 ms), its split-K reduction and the
bias inside the kernel (benchmarks/quant_gemv.py --cold, docs/benchmarks.md). `use_gemv` switches every
float `nn.Linear` of a model to `GemvLinear`, which takes that kernel for exactly one row of half-precision
CUDA activations without autograd, and is `nn.Linear` otherwise: prefill, batches, training and the CPU are
unchanged, and so are the parameters and the state dict. The engine's runner applies it on CUDA by default
(`ModelRunner(gemv=True)`): batch-1 steps 5% faster end to end (`sambay bench --formats bf16 bf16-gemv`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _kernel_device(x: Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.disable
def _gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The kernel, hidden from Dynamo (as `sambay.ops.for_compile` hides ours): its launcher's host code
    never becomes a guard; the compiled step breaks its graph here and fuses what lies between."""
    from sambay.ops.triton.quantized_matmul import gemv

    return gemv(x, weight, bias)


class GemvLinear(nn.Linear):
    """`nn.Linear` whose one-row, no-grad, half-precision forward runs `gemv` (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.numel() == self.in_features and x.dtype in (torch.bfloat16, torch.float16)
                and x.dtype == self.weight.dtype and _kernel_device(x) and not torch.is_grad_enabled()):
            return _gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> int:
    """Every plain `nn.Linear` of ``model`` becomes a `GemvLinear` (in place); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
            count += 1
    return count


__all__ = ["GemvLinear", "use_gemv"]
