"""`LoRALinear`: a frozen Linear plus a low-rank update (Hu et al., arXiv 2106.09685, §4.1, eq. 3).

    y = base(x) + s · B (A x)        A: (r, in_features), B: (out_features, r), s = alpha / r

B starts at zero, so a fresh adapter leaves the model's outputs unchanged; A starts as PEFT's (and the
paper's reference code's) Kaiming-uniform. The wrapped module's own ``forward`` is kept, so a Linear
with special semantics (Mamba's `DeltaProjection`, whose bias the scan adds) gets the same update.

Adapters are stacked: ``lora_A`` is (n_adapters, r, in_features), ``lora_B`` (n_adapters, out_features, r)
and ``scaling`` (n_adapters,). Training, merging and ``sambay generate --lora`` use one adapter (slot 0).
A multi-adapter server (S-LoRA, arXiv 2311.03285; vLLM's punica kernels) binds a per-row adapter index,
``adapter_index`` (max_rows,) int64, owned by the model runner (`bind_adapter_index`); forward then gathers
each row's A and B (`lora_delta_gathered`), adapters of lower rank padded with zeros up to r.

Dtypes: A and B are created in fp32 for training (autocast runs the matmuls in bf16) or in the model
dtype for inference; the update is computed in their dtype and added in the base output's dtype.

QLoRA (Dettmers et al., arXiv 2305.14314, §3): `QLoRALinear` is the same update over a frozen int8 / int4
`sambay.quant.QuantizedLinear`, called as a black box ``y = base(x)``. Its int weights and fp32 scales are
buffers: no optimiser sees them and an adapter never holds them. While autograd records, the base call is
recomputed in backward (`torch.utils.checkpoint`), because autograd would otherwise keep every layer's
dequantised weight from forward to backward: more memory than a bf16 base, which QLoRA exists to save.
A quantised base cannot be merged (folding needs the float weight: merge into the float checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sambay.quant import QuantizedLinear


class LoRALinear(nn.Module):
    """A Linear (frozen by the caller) plus ``n_adapters`` stacked low-rank updates; forward uses slot 0."""

    def __init__(self, base: nn.Linear | QuantizedLinear, rank: int, alpha: float, *, n_adapters: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        device = self._base_device()
        self.lora_A = nn.Parameter(torch.empty(n_adapters, rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, rank, device=device, dtype=dtype))
        # not persistent: set from the adapter's alpha / r whenever adapters are built or loaded
        self.register_buffer("scaling", torch.full((n_adapters,), alpha / rank, device=device), persistent=False)
        # (max_rows,) int64 slot of each batch row, the runner's tensor (`bind_adapter_index`); None: slot 0
        self.register_buffer("adapter_index", None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A: Kaiming-uniform with a = sqrt(5) per adapter (PEFT's default), B: zeros."""
        bound = 1.0 / math.sqrt(self.lora_A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on (r, in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def _base_device(self) -> torch.device:
        return self.base.weight.device

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (code that reads a Linear's weight, such as tensor parallelism, sees the base; a
        quantised base has none)."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) → (..., out_features); with an adapter index bound, x is (b, ..., in_features)
        and row i takes the adapter of slot ``adapter_index[i]``."""
        y = self.base_forward(x)
        if self.adapter_index is None:
            delta = lora_delta(x, self.lora_A[0], self.lora_B[0], self.scaling[0])
        else:
            index = self.adapter_index[: x.shape[0]]  # (b,): a static slice, so a CUDA graph replays it
            delta = lora_delta_gathered(x, self.lora_A, self.lora_B, self.scaling, index)
        return y + delta.to(y.dtype)

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen layer's output, base(x)."""
        return self.base(x)

    @torch.no_grad()
    def merged_weight(self, slot: int = 0) -> Tensor:
        """W + s · B A of adapter ``slot``, computed in fp32 and rounded once to the base weight's dtype."""
        w = self.base.weight
        update = self.scaling[slot].float() * (self.lora_B[slot].float() @ self.lora_A[slot].float())
        return (w.float() + update).to(w.dtype)  # (out_features, in_features)


class QLoRALinear(LoRALinear):
    """`LoRALinear` over a frozen `QuantizedLinear` (QLoRA): base(x) + s · B (A x), the base never merged."""

    def _base_device(self) -> torch.device:
        return self.base.qweight.device

    def base_forward(self, x: Tensor) -> Tensor:
        """base(x); recomputed in backward when autograd records it, so no dequantised weight is kept."""
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self.base, x, use_reentrant=False)
        return self.base(x)

    def merged_weight(self, slot: int = 0) -> Tensor:
        raise ValueError(f"cannot merge a LoRA adapter into a quantised layer ({self.base.extra_repr()}): folding "
                         "needs the float weight; merge the adapter into the float checkpoint instead")


def wrap(base: nn.Linear | QuantizedLinear, rank: int, alpha: float, *, n_adapters: int = 1,
         dtype: torch.dtype = torch.float32) -> LoRALinear:
    """The LoRA layer for ``base``: a `QLoRALinear` around a `QuantizedLinear`, else a `LoRALinear`."""
    kind = QLoRALinear if isinstance(base, QuantizedLinear) else LoRALinear
    return kind(base, rank, alpha, n_adapters=n_adapters, dtype=dtype)


def lora_delta(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor) -> Tensor:
    """s · B (A x) for one adapter, never forming B A.

    Args:
        x: (..., in_features).
        A: (r, in_features); B: (out_features, r); scaling: () tensor.

    Returns:
        (..., out_features) in A's dtype (under autocast, the autocast dtype).
    """
    return F.linear(F.linear(x.to(A.dtype), A), B) * scaling.to(A.dtype)


def lora_delta_gathered(x: Tensor, A: Tensor, B: Tensor, scaling: Tensor, index: Tensor) -> Tensor:
    """s[i] · B[i] (A[i] x) per row, i = the row's slot: the reference of a gathered (BGMV-style) LoRA matmul.

    Args:
        x: (b, ..., in_features).
        A: (n, r, in_features); B: (n, out_features, r); scaling: (n,).
        index: (b,) int64 slot of each row of x.

    Returns:
        (b, ..., out_features) in A's dtype; a row of slot i equals `lora_delta` with adapter i.
    """
    b = x.shape[0]
    rows = x.reshape(b, -1, x.shape[-1]).to(A.dtype)  # (b, t, in_features)
    low = torch.bmm(rows, A[index].transpose(1, 2))  # (b, t, r)
    delta = torch.bmm(low, B[index].transpose(1, 2)) * scaling[index].to(A.dtype)[:, None, None]  # (b, t, out)
    return delta.reshape(*x.shape[:-1], B.shape[1])


def bind_adapter_index(model: nn.Module, index: Tensor) -> int:
    """Make every `LoRALinear` of ``model`` read its rows' slots from ``index`` ((max_rows,) int64, on the
    model's device, owned and filled by the caller); returns the number of layers bound.

    Bound once, before any CUDA graph is captured: the layers hold the tensor, never a copy, so the graphs
    read whatever the runner writes into it."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.adapter_index = index
    return len(layers)
