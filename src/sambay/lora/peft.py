"""LoRA adapters in PEFT's on-disk format: write ours, read anyone's (checked), attach or merge them.

An adapter directory holds (PEFT's `save_pretrained`, https://huggingface.co/docs/peft, "LoRA")::

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora",
                                  "rank_pattern", "alpha_pattern", "bias": "none", ...}
    adapter_model.safetensors    "base_model.model.<module>.lora_A.weight"  (r, in_features)
                                 "base_model.model.<module>.lora_B.weight"  (out_features, r)

``<module>`` is the module's name in the released checkpoint (``model.layers.3.attn.Wqkv``), from the one
name table in `sambay.checkpoint` (`hf_module_name`). Every LoRA target is one of our Linear layers and
exactly one checkpoint tensor, with the same layout: the fused ``Wqkv`` ([q | k | v]), Mamba's
``in_proj`` ([x | z]) and the MLP's ``fc1`` ([gate | up]) are fused in the release too, and the cross
layers' Q-only projection is stored as ``Wqkv``. So A and B are copied as they are, never split or
concatenated; a target whose layout differed would need the same split/concatenation of B's rows (and of
A's columns) as `sambay.checkpoint` applies to the weight.

The scale of a layer is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with per-layer
overrides from ``rank_pattern`` / ``alpha_pattern`` (keys matched as PEFT does: a key matches a module name
that ends with it). What PEFT can store but sambay does not apply (DoRA, trained biases, modules_to_save,
embedding or LM-head adapters, fan_in_fan_out) is refused with a one-line `AdapterError`, as is any
inconsistency: a rank that disagrees with the config, a lone A or B, a module the model does not have, or
a shape of another model.

On a quantised model (`sambay.quant`) adapters attach as they do on a float one, around the
`QuantizedLinear`s (QLoRA), and `apply_adapter` keeps them unmerged there; `merge_adapter` refuses it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sambay.checkpoint import hf_name
from sambay.lora.layer import LoRALinear
from sambay.lora.targets import linear_layers, lora_layers, merge_lora, wrap_layer
from sambay.quant import QuantizedLinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix for the wrapped model's module names
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json options that change the math in ways sambay does not implement → their neutral values
_UNSUPPORTED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
                "modules_to_save": (None, []), "layer_replication": (None, []), "lora_bias": (False, None)}


class AdapterError(ValueError):
    """An adapter that cannot be read or does not fit the model; the message is one line."""


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted layer: y += scaling · B (A x)."""

    A: Tensor  # (r, in_features)
    B: Tensor  # (out_features, r)
    scaling: float


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from PEFT's files and checked against itself (not yet against a model)."""

    directory: Path
    config: dict
    layers: dict[str, AdapterLayer]  # checkpoint module name → its update


def hf_module_name(path: str, config) -> str:
    """Our module path → the checkpoint's module name (``…layers.3.mixer.qkv`` → ``model.layers.3.attn.Wqkv``).

    Built on `sambay.checkpoint.hf_name`, the one name table, through the module's weight."""
    return hf_name(f"{path}.weight", config).removesuffix(".weight")


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write every adapter of ``model`` (slot 0 of each `LoRALinear`) in PEFT's format; returns the directory.

    Args:
        model: a SambaY with adapters (`sambay.lora.apply_lora`), unwrapped.
        directory: created if needed; the two files are written under temporary names and renamed.
        base_model: recorded as ``base_model_name_or_path`` (informational).
    """
    layers = {hf_module_name(path, model.config): layer for path, layer in lora_layers(model).items()}
    if not layers:
        raise ValueError("the model has no LoRA adapters to save")
    ranks = {name: layer.rank for name, layer in layers.items()}
    alphas = {name: float(layer.scaling[0]) * layer.rank for name, layer in layers.items()}
    r, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    candidates = {hf_module_name(path, model.config) for path, _ in linear_layers(model)}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": _target_modules(set(layers), candidates),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[0].detach().to("cpu").contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[0].detach().to("cpu").contiguous()
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / f".{WEIGHTS_FILE}.tmp", metadata={"format": "pt"})
    os.replace(root / f".{WEIGHTS_FILE}.tmp", root / WEIGHTS_FILE)
    (root / f".{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(root / f".{CONFIG_FILE}.tmp", root / CONFIG_FILE)
    return root


def _target_modules(chosen: set[str], candidates: set[str]) -> list[str]:
    """PEFT's ``target_modules``: the short suffixes (``Wqkv``, ``x_proj``) when they select exactly the
    adapted layers, else every full name (``out_proj`` names attention, Mamba and GMU layers alike)."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    matched = {name for name in candidates if name.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matched == chosen else sorted(chosen)


def read_adapter(directory: str | os.PathLike) -> Adapter:
    """Read and check a PEFT LoRA adapter directory (before any model is loaded).

    Raises:
        AdapterError: a missing or unreadable file, an option sambay does not apply, a stray or lone
            tensor, or a rank that disagrees with ``r`` / ``rank_pattern``.
    """
    root = Path(directory)
    config = _read_config(root)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        pickle = (root / "adapter_model.bin").exists()
        other = " (adapter_model.bin is a pickle, which sambay does not read)" if pickle else ""
        raise AdapterError(f"{root}: no {WEIGHTS_FILE}{other}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA matrix of a Linear layer "
                               f"(expected {PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(match["module"], {})[match["part"]] = value
    if not pairs:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    layers = {name: _layer(name, parts, config, weights) for name, parts in sorted(pairs.items())}
    return Adapter(directory=root, config=config, layers=layers)


def _read_config(root: Path) -> dict:
    file = root / CONFIG_FILE
    if not root.is_dir():
        raise AdapterError(f"adapter directory {root} does not exist")
    if not file.is_file():
        raise AdapterError(f"{root} is not a PEFT adapter directory: no {CONFIG_FILE}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: peft_type is {config.get('peft_type')!r}; sambay applies LORA adapters")
    for key, neutral in _UNSUPPORTED.items():
        if config.get(key, neutral[0]) not in neutral:
            raise AdapterError(f"{file}: {key}={config[key]!r} is not supported (sambay applies plain LoRA)")
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{file}: r must be a positive int, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"{file}: lora_alpha must be a number, got {alpha!r}")
    return config


def _pattern_value(patterns: dict | None, name: str, default, file: Path):
    """The value of the first ``patterns`` key that matches module ``name`` (PEFT: a key matches a name ending
    in ``.key``), else ``default``."""
    for key, value in (patterns or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?{key}", name):
                return value
        except re.error as e:
            raise AdapterError(f"{file}: bad pattern {key!r} ({e})") from None
    return default


def _layer(name: str, parts: dict[str, Tensor], config: dict, weights: Path) -> AdapterLayer:
    """One module's A and B, checked against each other and the configured rank, with its scale."""
    if set(parts) != {"A", "B"}:
        lone = next(iter(parts))
        raise AdapterError(f"{weights}: {name} has lora_{lone} but no lora_{'B' if lone == 'A' else 'A'}")
    A, B = parts["A"], parts["B"]
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AdapterError(f"{weights}: {name}: lora_A and lora_B must be floating point, got {A.dtype}, {B.dtype}")
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(f"{weights}: {name}: lora_A {list(A.shape)} and lora_B {list(B.shape)} are not "
                           "(r, in_features) and (out_features, r)")
    file = weights.with_name(CONFIG_FILE)
    r = _pattern_value(config.get("rank_pattern"), name, config["r"], file)
    if A.shape[0] != r:
        raise AdapterError(f"{weights}: {name} has rank {A.shape[0]} but {CONFIG_FILE} says r={r}")
    alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8), file)
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    return AdapterLayer(A=A, B=B, scaling=float(scaling))


def attach_adapter(model: nn.Module, adapter: Adapter, *, dtype: torch.dtype = torch.float32
                   ) -> dict[str, LoRALinear]:
    """Wrap each layer ``adapter`` names in a `LoRALinear` holding its A and B (unmerged, as in training).

    Every layer is checked before the model is touched: a module this model does not have, or shapes of
    another model, is an `AdapterError` and the model is left as it was.

    Returns:
        {module path: LoRALinear}.
    """
    paths = {hf_module_name(path, model.config): (path, layer) for path, layer in linear_layers(model)}
    for name, layer in adapter.layers.items():
        _check_fits(name, layer, paths, adapter.directory)
    attached = {}
    for name, update in adapter.layers.items():
        path, _ = paths[name]
        layer = wrap_layer(model, path, update.A.shape[0], update.scaling * update.A.shape[0], dtype=dtype)
        with torch.no_grad():
            layer.scaling.fill_(update.scaling)
            layer.lora_A[0].copy_(update.A)
            layer.lora_B[0].copy_(update.B)
        layer.requires_grad_(False)
        attached[path] = layer
    return attached


def attach_adapters(model: nn.Module, adapters: list[Adapter], *, dtype: torch.dtype | None = None
                    ) -> dict[str, LoRALinear]:
    """Stack several adapters in every layer any of them names, for serving them side by side (unmerged).

    Slot 0 of each `LoRALinear` is all zeros (the base model's rows); adapter k goes to slot k + 1, zeros in
    the layers it does not name, its A and B zero-padded up to the layer's largest rank (zero columns of A
    and rows of B add nothing). Rows pick their slot through a bound index (`bind_adapter_index`). Every
    adapter is checked before the model is touched, as in `attach_adapter`.

    Args:
        model: a SambaY without adapters.
        adapters: read by `read_adapter`, in slot order (slot k + 1 for ``adapters[k]``).
        dtype: of A and B (default: the base layer's weight dtype; a quantised base's is the model's).

    Returns:
        {module path: LoRALinear} of the layers that got adapters.
    """
    paths = {hf_module_name(path, model.config): (path, layer) for path, layer in linear_layers(model)}
    for adapter in adapters:
        for name, layer in adapter.layers.items():
            _check_fits(name, layer, paths, adapter.directory)
    names = sorted({name for adapter in adapters for name in adapter.layers})
    attached = {}
    for name in names:
        path, base = paths[name]
        updates = [adapter.layers.get(name) for adapter in adapters]
        rank = max(u.A.shape[0] for u in updates if u is not None)
        layer = wrap_layer(model, path, rank, float(rank), dtype=dtype or _compute_dtype(model, base),
                           n_adapters=len(adapters) + 1)
        with torch.no_grad():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
            layer.scaling.zero_()
            for slot, update in enumerate(updates, start=1):
                if update is not None:
                    r = update.A.shape[0]
                    layer.lora_A[slot, :r].copy_(update.A)
                    layer.lora_B[slot, :, :r].copy_(update.B)
                    layer.scaling[slot] = update.scaling
        layer.requires_grad_(False)
        attached[path] = layer
    return attached


def _check_fits(name: str, update: AdapterLayer, paths: dict[str, tuple[str, nn.Module]], where: Path) -> None:
    if name not in paths:
        kinds = ", ".join(sorted({target.rsplit(".", 1)[-1] for target in paths}))
        raise AdapterError(f"adapter {where} targets {name}, which this model does not have as a LoRA target "
                           f"(its {len(paths)} targets are Linear layers named {kinds})")
    _, layer = paths[name]
    if isinstance(layer, LoRALinear):
        raise AdapterError(f"adapter {where}: {name} already has an adapter")
    out_features, in_features = layer.out_features, layer.in_features  # a Linear or a QuantizedLinear
    found = (update.B.shape[0], update.A.shape[1])
    if found != (out_features, in_features):
        raise AdapterError(f"adapter {where}: {name} is {found[1]} -> {found[0]} in the adapter but "
                           f"{in_features} -> {out_features} in this model: the adapter is for another model")


def _compute_dtype(model: nn.Module, base: nn.Module) -> torch.dtype:
    """The dtype inference runs ``base`` in: its weight's, or for a quantised base (int weights) the model's."""
    return model.dtype if isinstance(base, QuantizedLinear) else base.weight.dtype


def merge_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Apply ``adapter`` by folding it into the weights (W ← W + s · B A, in fp32, rounded once); returns
    ``model``, with plain Linear layers: no cost at inference.

    Raises:
        AdapterError: the adapter does not fit, or names a quantised layer (folding needs the float weight);
            the model is left as it was.
    """
    paths = {hf_module_name(path, model.config): layer for path, layer in linear_layers(model)}
    quantized = sorted(name for name in adapter.layers if isinstance(paths.get(name), QuantizedLinear))
    if quantized:
        raise AdapterError(f"adapter {adapter.directory} cannot be merged into a quantised model (it adapts "
                           f"{len(quantized)} int8 / int4 layers, such as {quantized[0]}): merging needs the float "
                           "weights; merge it into the float checkpoint the model was quantised from")
    attach_adapter(model, adapter)
    return merge_lora(model)


def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Apply ``adapter`` for inference (``--lora DIR``); returns ``model``.

    Folded into the weights where the model is float (`merge_adapter`, free at inference); on a quantised
    model (QLoRA) kept unmerged in the model's dtype (`attach_adapter`), which adds s · B (A x) per layer.
    """
    if any(isinstance(layer, QuantizedLinear) for _, layer in linear_layers(model)):
        attach_adapter(model, adapter, dtype=model.dtype)
        return model
    return merge_adapter(model, adapter)
