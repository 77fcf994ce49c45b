"""The released checkpoint format (HF `model_type: phi4flash`) ↔ our config and parameter names.

This is the only module where Hugging Face key names appear (STYLE §2):
- `config_from_hf` / `config_to_hf`: `config.json` ↔ `SambaYConfig`; unknown keys are rejected,
  keys that do not affect the model are listed in `IGNORED_HF_KEYS`;
- `PARAMETER_NAMES`: ONE table from our module paths to the checkpoint's (`attn` for every mixer,
  `Wqkv`, `inner_cross_attn`, `conv1d`, `fc1`/`fc2`, `input_layernorm`, …);
- `load_model` / `save_model`: sharded safetensors with `model.safetensors.index.json` or one file.
  Pickles are never read. Tensors go straight from the file to the target device and dtype one at a
  time, so peak memory is the model plus one tensor. ``A_log`` and ``lambda_*`` stay fp32 whatever
  the requested dtype, as the release stores them. ``torch_dtype`` must name a float dtype we load
  (int8 and other quantised checkpoints are refused, not read as float32). A tied head
  (``tie_word_embeddings``) is the embedding: an ``lm_head.weight`` stored beside it is ignored, with
  a warning if it differs;
- errors in a config.json name its keys (``hidden_size``), not our fields (``d_model``); a path to a
  file inside a model directory (``DIR/config.json``) stands for the directory (`model_directory`).

Variants that the phi4flash format cannot describe (another plan, plain attention, RoPE) are stored
with three extra keys, ``sambay_plan``, ``sambay_differential`` and ``sambay_rope_theta``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sambay.config import LayerKind, SambaYConfig, sambay_plan
from sambay.model.sambay import SambaY

log = logging.getLogger("sambay.checkpoint")

HF_MODEL_TYPE = "phi4flash"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# config.json keys that do not change the model's math; accepted and ignored on load.
IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "attention_dropout", "embd_pdrop", "resid_pdrop", "initializer_range",
    "use_cache", "_attn_implementation", "transformers_version", "torch_dtype", "dtype",
    "rope_theta",  # the release is NoPE: the remote code never reads it
    "rope_scaling", "_name_or_path",
})
# config.json keys that map onto SambaYConfig fields or are validated against fixed values.
_MAPPED_HF_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "sliding_window", "layer_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "hidden_act", "mlp_bias", "lm_head_bias", "mb_per_layer", "mamba_d_state", "mamba_d_conv", "mamba_expand",
    "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias", "layer_types", "bos_token_id", "eos_token_id",
    "pad_token_id", "sambay_plan", "sambay_differential", "sambay_rope_theta",
})
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# SambaYConfig field → the config.json key it comes from, so that validation errors of a config read from
# config.json name the keys the user wrote (`hidden_size`, not `d_model`).
_HF_FIELD_NAMES = {
    "d_model": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "d_ff": "intermediate_size", "n_layers": "num_hidden_layers", "window": "sliding_window",
    "d_state": "mamba_d_state", "d_conv": "mamba_d_conv", "expand": "mamba_expand", "norm_eps": "layer_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_theta": "sambay_rope_theta", "mamba_every": "mb_per_layer",
}  # no plain English words ("differential", "plan"): messages use them as words too

# Our module path inside a block → the checkpoint's, for every parameter of every layer kind.
PARAMETER_NAMES: dict[str, str] = {
    "norm1": "input_layernorm",
    "norm2": "post_attention_layernorm",
    "mlp.in_proj": "mlp.fc1",
    "mlp.out_proj": "mlp.fc2",
    # Mamba and GMU
    "mixer.in_proj": "attn.in_proj",
    "mixer.conv": "attn.conv1d",
    "mixer.x_proj": "attn.x_proj",
    "mixer.dt_proj": "attn.dt_proj",
    "mixer.A_log": "attn.A_log",
    "mixer.D": "attn.D",
    # attention (self and cross); the cross layers' Q-only projection keeps the name Wqkv
    "mixer.qkv": "attn.Wqkv",
    "mixer.q_proj": "attn.Wqkv",
    "mixer.core.lambda_q1": "attn.inner_cross_attn.lambda_q1",
    "mixer.core.lambda_k1": "attn.inner_cross_attn.lambda_k1",
    "mixer.core.lambda_q2": "attn.inner_cross_attn.lambda_q2",
    "mixer.core.lambda_k2": "attn.inner_cross_attn.lambda_k2",
    "mixer.core.subln": "attn.inner_cross_attn.subln",
    "mixer.out_proj": "attn.out_proj",
}
_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.final_layernorm.weight",
    "norm.bias": "model.final_layernorm.bias",
    "lm_head.weight": "lm_head.weight",
}


# --- config -------------------------------------------------------------------------------------------


def config_from_hf(d: dict) -> SambaYConfig:
    """Build a `SambaYConfig` from a phi4flash ``config.json`` dict; raises ValueError naming the problem."""
    if d.get("model_type") != HF_MODEL_TYPE:
        raise ValueError(f"unsupported model_type {d.get('model_type')!r}: sambay reads {HF_MODEL_TYPE!r} checkpoints")
    unknown = sorted(set(d) - _MAPPED_HF_KEYS - IGNORED_HF_KEYS)
    if unknown:
        raise ValueError(f"config.json has keys sambay does not understand: {unknown}")
    for key, want in (("hidden_act", "silu"), ("mlp_bias", False), ("lm_head_bias", False),
                      ("mamba_proj_bias", False), ("mamba_dt_rank", "auto")):
        if key in d and d[key] != want:
            raise ValueError(f"config.json {key}={d[key]!r} is not supported (the architecture uses {want!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "sliding_window") if k not in d]
    if missing:
        raise ValueError(f"config.json lacks required keys: {missing}")
    checkpoint_dtype(d)
    n_layers = d["num_hidden_layers"]
    window = _sliding_window(d["sliding_window"])
    try:  # sambay_plan's and SambaYConfig's checks name our fields; the user edited config.json's
        plan = _plan(d, n_layers)
        config = SambaYConfig(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            d_ff=d["intermediate_size"],
            plan=plan,
            window=window,
            differential=d.get("sambay_differential", True),
            rope_theta=d.get("sambay_rope_theta"),
            d_state=d.get("mamba_d_state", 16),
            d_conv=d.get("mamba_d_conv", 4),
            expand=d.get("mamba_expand", 2),
            conv_bias=d.get("mamba_conv_bias", True),
            norm_eps=d.get("layer_norm_eps", 1e-5),
            tie_embeddings=d.get("tie_word_embeddings", True),
            max_seq_len=d.get("max_position_embeddings", 262144),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
    except ValueError as e:
        raise ValueError(_with_hf_names(str(e))) from None
    _check_layer_types(d.get("layer_types"), plan)
    return config


def _plan(d: dict, n_layers: int) -> tuple[LayerKind, ...]:
    if "sambay_plan" in d:
        plan = tuple(LayerKind(k) for k in d["sambay_plan"])
    else:
        if d.get("mb_per_layer", 2) != 2:
            raise ValueError(f"mb_per_layer={d['mb_per_layer']} is not supported (the phi4flash layout uses 2)")
        plan = sambay_plan(n_layers, 2)
    if len(plan) != n_layers:
        raise ValueError(f"the layer plan has {len(plan)} layers but num_hidden_layers is {n_layers}")
    return plan


def _with_hf_names(message: str) -> str:
    """``d_model (256) must be divisible by n_heads (6)`` → ``hidden_size (256) must be divisible by
    num_attention_heads (6)``: our field names in a validation message → config.json's keys."""
    message = re.sub(r"\b(?:SambaYConfig\.)?([a-z_]+)\b", lambda m: _HF_FIELD_NAMES.get(m[1], m[1]), message)
    return f"config.json: {message}"


def checkpoint_dtype(d: dict) -> torch.dtype | None:
    """The dtype config.json declares (``torch_dtype``, or newer transformers' ``dtype``); None if neither.

    Raises:
        ValueError: a dtype we cannot load (``int8``, ``float8_e4m3fn``, ...), naming the supported ones,
            rather than reading a quantised checkpoint as something else.
    """
    declared = {key: d[key] for key in ("torch_dtype", "dtype") if d.get(key) is not None}
    for key, name in declared.items():
        if name not in _DTYPES:
            raise ValueError(f"config.json {key}={name!r} is not supported; supported: {', '.join(_DTYPES)} "
                             "(sambay does not load quantised weights)")
    return next((_DTYPES[name] for name in declared.values()), None)


def _sliding_window(value) -> int:
    """The remote config class once stored a per-layer list (512 or None); every entry is the same window."""
    if isinstance(value, list):
        sizes = {v for v in value if v is not None}
        if len(sizes) != 1:
            raise ValueError(f"sliding_window list must hold exactly one window size, got {sorted(sizes)}")
        value = sizes.pop()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"sliding_window must be a positive int, got {value!r}")
    return value


def _check_layer_types(layer_types, plan: tuple[LayerKind, ...]) -> None:
    """HF's standard `layer_types` marks sliding layers; it must agree with the plan."""
    if layer_types is None:
        return
    expected = ["sliding_attention" if k is LayerKind.SLIDING_ATTENTION else "full_attention" for k in plan]
    if list(layer_types) != expected:
        raise ValueError("config.json layer_types disagrees with the phi4flash layer layout")


def config_to_hf(config: SambaYConfig, torch_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The phi4flash ``config.json`` dict for ``config`` (the released key set, plus sambay_* for variants)."""
    dtype_name = next(name for name, dt in _DTYPES.items() if dt == torch_dtype)
    d = {
        "architectures": ["Phi4FlashForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
            "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM",
            "AutoTokenizer": "Xenova/gpt-4o",
        },
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "embd_pdrop": 0.0,
        "eos_token_id": config.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": config.d_model,
        "initializer_range": 0.02,
        "intermediate_size": config.d_ff,
        "layer_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "_attn_implementation": "flash_attention_2",
        "mb_per_layer": 2,
        "model_type": HF_MODEL_TYPE,
        "num_attention_heads": config.n_heads,
        "num_hidden_layers": config.n_layers,
        "num_key_value_heads": config.n_kv_heads,
        "resid_pdrop": 0.0,
        "sliding_window": config.window,
        "torch_dtype": dtype_name,
        "tie_word_embeddings": config.tie_embeddings,
        "transformers_version": "4.46.1",
        "use_cache": True,
        "mlp_bias": False,
        "lm_head_bias": False,
        "vocab_size": config.vocab_size,
    }
    if (config.d_state, config.d_conv, config.expand, config.conv_bias) != (16, 4, 2, True):
        d.update(mamba_d_state=config.d_state, mamba_d_conv=config.d_conv, mamba_expand=config.expand,
                 mamba_conv_bias=config.conv_bias)
    n = config.n_layers
    if n % 4 or config.plan != sambay_plan(n, 2):
        d["sambay_plan"] = [k.value for k in config.plan]
    if not config.differential:
        d["sambay_differential"] = False
    if config.rope_theta is not None:
        d["sambay_rope_theta"] = config.rope_theta
    return d


# --- parameter names ------------------------------------------------------------------------------------


def hf_name(name: str, config: SambaYConfig) -> str:
    """Our parameter name → the checkpoint's.

    ``self_decoder.layers.3.mixer.qkv.weight`` → ``model.layers.3.attn.Wqkv.weight``.
    """
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    decoder, layers, index, rest = name.split(".", 3)
    if layers != "layers" or decoder not in ("self_decoder", "cross_decoder"):
        raise KeyError(f"no checkpoint name for parameter {name!r}")
    layer = int(index) + (config.n_self_layers if decoder == "cross_decoder" else 0)
    if rest in PARAMETER_NAMES:  # a bare parameter such as mixer.A_log
        return f"model.layers.{layer}.{PARAMETER_NAMES[rest]}"
    path, leaf = rest.rsplit(".", 1)
    if path not in PARAMETER_NAMES:
        raise KeyError(f"no checkpoint name for parameter {name!r}")
    return f"model.layers.{layer}.{PARAMETER_NAMES[path]}.{leaf}"


def name_pairs(model: SambaY) -> dict[str, str]:
    """{checkpoint name: our name} for every parameter of ``model``."""
    return {hf_name(name, model.config): name for name, _ in model.named_parameters()}


def to_hf_state_dict(model: SambaY) -> dict[str, Tensor]:
    """The model's parameters under checkpoint names (tensors shared, not copied)."""
    params = dict(model.named_parameters())
    return {hf: params[ours].detach() for hf, ours in name_pairs(model).items()}


def from_hf_state_dict(model: SambaY, state: dict[str, Tensor]) -> None:
    """Copy checkpoint-named tensors into ``model`` (in place; shapes and the name set must match exactly)."""
    pairs = name_pairs(model)
    _check_names(set(state), set(pairs), model.config, where="state dict")
    params = dict(model.named_parameters())
    if model.config.tie_embeddings and "lm_head.weight" in state:
        _check_tied_head(state["lm_head.weight"], state[_GLOBAL_NAMES["embed.weight"]], "state dict")
    with torch.no_grad():
        for hf, ours in pairs.items():
            _check_shape(hf, tuple(state[hf].shape), tuple(params[ours].shape))
            params[ours].copy_(state[hf])


def _check_names(found: set[str], expected: set[str], config: SambaYConfig, where: str) -> None:
    if config.tie_embeddings:
        found = found - {"lm_head.weight"}  # some exports write the tied head too; it equals the embedding
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors: {_preview(unexpected)}")
        raise ValueError(f"{where} does not match the model: " + "; ".join(parts))


def _check_shape(name: str, found: tuple, expected: tuple) -> None:
    if found != expected:
        raise ValueError(f"tensor {name} has shape {list(found)} but the model expects {list(expected)}")


def _preview(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


# --- files ------------------------------------------------------------------------------------------------


def model_directory(path: str | os.PathLike) -> Path:
    """The model directory ``path`` names: itself, or the directory of a file in it (``DIR/config.json``,
    a shard), so that ``--model DIR/config.json`` works.

    Raises:
        FileNotFoundError: ``path`` is a file whose directory has no config.json.
    """
    path = Path(path)
    if path.is_file():
        if not (path.parent / "config.json").is_file():
            raise FileNotFoundError(f"expected a model directory, got a file: {path}; use its directory")
        return path.parent
    return path


def read_config(path: str | os.PathLike) -> tuple[SambaYConfig, dict]:
    """(SambaYConfig, raw dict) from ``path/config.json`` (``path``: a model directory or a file in it)."""
    file = model_directory(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a model directory needs config.json")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    return config_from_hf(raw), raw


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file} for a model directory (sharded with an index, or one file)."""
    root = model_directory(path)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map")
        files = {name: root / shard for name, shard in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise FileNotFoundError(f"missing checkpoint shard(s) in {root}: {', '.join(absent)}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(
        f"no {INDEX_FILE} or {SINGLE_FILE} in {root} (sambay reads safetensors only, never pickled .bin files)"
    )


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> SambaY:
    """Load a model directory in the released format onto ``device`` in ``dtype``.

    Args:
        path: directory with ``config.json`` and safetensors weights (sharded with an index, or one file);
            a file in that directory (its ``config.json``) stands for the directory.
        device: target device (default CPU). Tensors are moved one at a time.
        dtype: parameter dtype (default: the checkpoint's ``torch_dtype``). ``A_log`` and ``lambda_*``
            stay fp32.
        backend: ops backend, see `sambay.ops.resolve_backend`.
        progress: show a progress bar on stderr.

    Raises:
        FileNotFoundError: no config.json, no weights, or a shard named by the index is absent.
        ValueError: unsupported config or ``torch_dtype``, or missing / unexpected / mis-shaped tensors
            (named).
    """
    path = model_directory(path)
    config, raw = read_config(path)
    files = weight_files(path)
    dtype = dtype or checkpoint_dtype(raw) or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = SambaY(config, backend=backend)
    model.to_dtype(dtype)
    pairs = name_pairs(model)
    _check_names(set(files), set(pairs), config, where=f"checkpoint {path}")
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for hf in pairs:
        by_file.setdefault(files[hf], []).append(hf)
    total = sum(file.stat().st_size for file in by_file)  # the bytes read, whatever dtype they become
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"loading {Path(path).name}", total=total)
        for file, names in by_file.items():
            for hf, value in _read_tensors(file, names, {hf: params[pairs[hf]].shape for hf in names}):
                target = params[pairs[hf]]
                _assign(model, pairs[hf], value.to(device=device, dtype=target.dtype))
                bar.advance(task, value.numel() * value.element_size())
        bar.update(task, completed=total)  # the files' headers
    if config.tie_embeddings and "lm_head.weight" in files:
        [(_, head)] = _read_tensors(files["lm_head.weight"], ["lm_head.weight"],
                                    {"lm_head.weight": model.embed.weight.shape})
        _check_tied_head(head.to(device=device, dtype=model.embed.weight.dtype), model.embed.weight, str(path))
    return model.eval()


def _check_tied_head(head: Tensor, embed: Tensor, where: str) -> None:
    """A tied model reads its head from the embedding. An ``lm_head.weight`` stored beside it is ignored:
    silently when it is the embedding (some exports write both), with a warning when it is not, since
    then the checkpoint probably has an untied head that config.json mislabels."""
    if not torch.equal(head, embed):
        log.warning("%s: config.json says tie_word_embeddings: true, but the checkpoint's lm_head.weight differs "
                    "from the embedding; it is ignored and the head is the embedding. If the head was trained "
                    "separately, set \"tie_word_embeddings\": false in config.json.", where)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_tensors(file: Path, names: list[str], shapes: dict[str, torch.Size]):
    """Yield (name, CPU tensor) for ``names`` of one safetensors file, reading each with plain file I/O.

    The format is an 8-byte little-endian header length, a JSON header of {name: dtype, shape,
    data_offsets}, then the raw bytes. Reading with ``readinto`` rather than through a memory map keeps
    file pages out of the process's resident set, so peak memory stays at the model plus one tensor.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"{file.name} is not a safetensors file (bad header length)")
        header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name in names:
            entry = header.get(name)
            if entry is None:
                raise ValueError(f"tensor {name} is listed in the index but absent from {file.name}")
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} in {file.name} has unsupported dtype {entry['dtype']}")
            _check_shape(name, tuple(entry["shape"]), tuple(shapes[name]))
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            if end - begin != tensor.numel() * tensor.element_size() or base + end > size:
                raise ValueError(f"tensor {name} in {file.name} has inconsistent data offsets (truncated file?)")
            f.seek(base + begin)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{file.name} is truncated while reading {name}")
            yield name, tensor


def _assign(model: nn.Module, name: str, value: Tensor) -> None:
    module, leaf = name.rsplit(".", 1)
    setattr(model.get_submodule(module), leaf, nn.Parameter(value))


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


def save_model(model: SambaY, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``model`` in the released format: config.json, sharded safetensors and their index.

    Each file is written under a temporary name and renamed, so an interrupted save never leaves a
    truncated file under a final name.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tmp = root / f".{file}.tmp"
        save_file({k: v.to("cpu").contiguous() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, root / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(root / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(root / "config.json", config_to_hf(model.config, torch_dtype=model.dtype))


def _write_json(file: Path, data: dict) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, file)
