"""Which Linear layers get LoRA adapters, and applying / merging them on an unmodified SambaY.

Named targets, by the module type that owns the projection (layer kinds are types, so no name matching):

    target               projections (our name → the checkpoint's)       in
    attention.qkv        qkv → attn.Wqkv (cross-attention: q_proj → Wqkv)  sliding / full / cross attention
    attention.out_proj   out_proj → attn.out_proj                          sliding / full / cross attention
    mamba.in_proj        in_proj → attn.in_proj                            every Mamba layer
    mamba.x_proj         x_proj → attn.x_proj
    mamba.dt_proj        dt_proj → attn.dt_proj
    mamba.out_proj       out_proj → attn.out_proj
    gmu.in_proj          in_proj → attn.in_proj                            every GMU layer
    gmu.out_proj         out_proj → attn.out_proj
    mlp.in_proj          in_proj → mlp.fc1 ([gate | up], fused in both)    every block
    mlp.out_proj         out_proj → mlp.fc2

Groups: ``attention``, ``mamba``, ``gmu``, ``mlp`` (their projections) and ``all`` (every one, the
default). Every target is one of our Linear layers and exactly one checkpoint tensor (no fused or
split layouts differ between the two: see `sambay.lora.peft`), so an adapter's A and B need no
reshaping. The embedding and the (tied) LM head are not targets. In a quantised model (`sambay.quant`)
the big projections are `QuantizedLinear`s: they are targets too, wrapped in `QLoRALinear` (QLoRA), under
the same names, so an adapter trained on the int4 / int8 base applies to the float one and back.

`apply_lora` freezes every parameter of the model and wraps the chosen layers in `LoRALinear`, the
way `sambay.train.parallel` applies its wrappers: from outside, the model's code unchanged.
`merge_lora` folds the updates into the weights and unwraps them again (float bases only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sambay.lora.layer import LoRALinear, QLoRALinear, wrap
from sambay.model.attention import CrossAttention, FullAttention, SlidingWindowAttention
from sambay.model.gmu import GatedMemoryUnit
from sambay.model.mamba import Mamba
from sambay.model.mlp import SwiGLUMLP
from sambay.quant import QuantizedLinear

_ATTENTION = (SlidingWindowAttention, FullAttention, CrossAttention)
# target → (owner module types, the owner's attribute names of its projections)
TARGETS: dict[str, tuple[tuple[type, ...], tuple[str, ...]]] = {
    "attention.qkv": (_ATTENTION, ("qkv", "q_proj")),
    "attention.out_proj": (_ATTENTION, ("out_proj",)),
    "mamba.in_proj": ((Mamba,), ("in_proj",)),
    "mamba.x_proj": ((Mamba,), ("x_proj",)),
    "mamba.dt_proj": ((Mamba,), ("dt_proj",)),
    "mamba.out_proj": ((Mamba,), ("out_proj",)),
    "gmu.in_proj": ((GatedMemoryUnit,), ("in_proj",)),
    "gmu.out_proj": ((GatedMemoryUnit,), ("out_proj",)),
    "mlp.in_proj": ((SwiGLUMLP,), ("in_proj",)),
    "mlp.out_proj": ((SwiGLUMLP,), ("out_proj",)),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(TARGETS),
    "attention": ("attention.qkv", "attention.out_proj"),
    "mamba": ("mamba.in_proj", "mamba.x_proj", "mamba.dt_proj", "mamba.out_proj"),
    "gmu": ("gmu.in_proj", "gmu.out_proj"),
    "mlp": ("mlp.in_proj", "mlp.out_proj"),
}


def resolve_targets(names: Iterable[str]) -> tuple[str, ...]:
    """Target and group names → the targets they name, in table order.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or none at all.
    """
    chosen: set[str] = set()
    for name in names:
        if name in GROUPS:
            chosen.update(GROUPS[name])
        elif name in TARGETS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown LoRA target {name!r}; choose from groups {', '.join(GROUPS)} or targets "
                             f"{', '.join(TARGETS)}")
    if not chosen:
        raise ValueError("no LoRA targets given")
    return tuple(t for t in TARGETS if t in chosen)


def linear_layers(model: nn.Module, targets: Iterable[str] = GROUPS["all"]) -> Iterator[tuple[str, nn.Module]]:
    """(module path, layer) of every projection that ``targets`` name, in model order.

    A layer already wrapped in `LoRALinear` is yielded as the wrapper. Each layer is yielded once even when
    two targets name it (it cannot happen with the table above, but a path is never wrapped twice).
    """
    wanted = [TARGETS[t] for t in targets]
    seen: set[str] = set()
    for path, owner in model.named_modules():
        for types, attributes in wanted:
            if not isinstance(owner, types):
                continue
            for attribute in attributes:
                layer = getattr(owner, attribute, None)
                name = f"{path}.{attribute}"
                if isinstance(layer, nn.Linear | QuantizedLinear | LoRALinear) and name not in seen:
                    seen.add(name)
                    yield name, layer


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of every adapted layer of ``model``."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def freeze(model: nn.Module) -> None:
    """Stop gradients to every parameter of ``model`` (the base of a LoRA run)."""
    for p in model.parameters():
        p.requires_grad_(False)


def wrap_layer(model: nn.Module, path: str, rank: int, alpha: float, *, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None, n_adapters: int = 1) -> LoRALinear:
    """Replace the Linear at ``path`` by a `LoRALinear` around it (B = 0: the outputs are unchanged); a
    `QuantizedLinear` gets a `QLoRALinear`."""
    parent, attribute = path.rsplit(".", 1)
    owner = model.get_submodule(parent)
    base = getattr(owner, attribute)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{path} already has a LoRA adapter")
    layer = wrap(base, rank, alpha, n_adapters=n_adapters, dtype=dtype)
    if generator is not None:
        layer.reset_parameters(generator)
    setattr(owner, attribute, layer)
    return layer


def apply_lora(model: nn.Module, targets: Iterable[str] = ("all",), *, rank: int, alpha: float | None = None,
               generator: torch.Generator | None = None) -> dict[str, LoRALinear]:
    """Freeze ``model`` and give every projection that ``targets`` name a trainable adapter.

    Args:
        model: a SambaY (unwrapped: before activation checkpointing, compile or data parallelism).
        targets: target or group names (see the module docstring).
        rank: r, the adapters' rank.
        alpha: the update is scaled by alpha / r (None: alpha = r, a scale of 1).
        generator: seeds the A matrices (default: torch's global generator).

    Returns:
        {module path: LoRALinear} of the new adapters, whose A and B are the only trainable parameters.
    """
    alpha = float(rank if alpha is None else alpha)
    freeze(model)
    paths = [path for path, _ in linear_layers(model, resolve_targets(targets))]
    return {path: wrap_layer(model, path, rank, alpha, generator=generator) for path in paths}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + s · B A) and put the plain Linear back; returns ``model``.

    Raises:
        ValueError: a layer holds stacked adapters, or its base is quantised (checked before any is merged).
    """
    layers = lora_layers(model)
    for path, layer in layers.items():
        if layer.lora_A.shape[0] != 1:
            raise ValueError(f"{path} holds {layer.lora_A.shape[0]} stacked adapters; only one can be merged")
        if isinstance(layer, QLoRALinear):
            raise ValueError(f"cannot merge LoRA into {path}: its base is quantised ({layer.base.extra_repr()}), "
                             "and folding needs the float weight; merge into the float checkpoint instead")
    for path, layer in layers.items():
        layer.base.weight.copy_(layer.merged_weight())
        parent, attribute = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attribute, layer.base)
    return model
