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
  (int8 and other quantised checkpoints are refused, not read as float32; sambay's own weight-only format,
  marked by a ``quantization_config.json``, is read through `sambay.quant`). A tied head
  (``tie_word_embeddings``) is the embedding: an ``lm_head.weight`` stored beside it is ignored, with
  a warning if it differs;
- errors in a config.json name its keys (``hidden_size``), not our fields (``d_model``); a path to a
  file inside a model directory (``DIR/config.json``) stands for the directory (`model_directory`);
- hostile or corrupt files (issue 13): every file is checked before anything is allocated (config.json's
  types and size bounds, then the index, headers and tensors in `sambay.safetensors_io`), and each
  problem is one `CheckpointError` (a ValueError) naming the file and the field.

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
from safetensors.torch import save_file
from torch import Tensor, nn

from sambay.config import MAX_LAYERS, LayerKind, SambaYConfig, sambay_plan
from sambay.model.sambay import SambaY
from sambay.safetensors_io import (
    INDEX_FILE,
    CheckpointError,
    check_tensors,
    json_type_name,
    parse_json,
    read_header,
    read_tensors,
    shard_files,
    short,
)

log = logging.getLogger("sambay.checkpoint")

HF_MODEL_TYPE = "phi4flash"

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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


# config.json key → (what it must be, the test). Checked before any value is used, so that a string, a list or
# a float where an int belongs is a message naming the key, not a TypeError deep inside the model's build.
_HF_TYPES = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "mb_per_layer", "mamba_d_state",
                     "mamba_d_conv", "mamba_expand"), ("an int", _is_int)),
    **dict.fromkeys(("tie_word_embeddings", "mamba_conv_bias", "sambay_differential"),
                    ("true or false", lambda v: isinstance(v, bool))),
    **dict.fromkeys(("bos_token_id", "pad_token_id"), ("an int or null", lambda v: v is None or _is_int(v))),
    **dict.fromkeys(("torch_dtype", "dtype"), ("a string or null", lambda v: v is None or isinstance(v, str))),
    **dict.fromkeys(("layer_types", "sambay_plan"),
                    ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))),
    "layer_norm_eps": ("a number", _is_number),
    "sambay_rope_theta": ("a number or null", lambda v: v is None or _is_number(v)),
    "eos_token_id": ("an int, a list of ints or null",
                     lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v)))),
    "sliding_window": ("an int or a list of ints and nulls",
                       lambda v: _is_int(v) or (isinstance(v, list) and all(x is None or _is_int(x) for x in v))),
}

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
    """Build a `SambaYConfig` from a phi4flash ``config.json`` dict.

    Raises:
        CheckpointError: (a ValueError) a wrong type, value or size, naming the config.json key.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"config.json must be a JSON object of settings, got {json_type_name(d)}")
    if d.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"config.json: unsupported model_type {short(repr(d.get('model_type')))}: sambay "
                              f"reads {HF_MODEL_TYPE!r} checkpoints")
    unknown = sorted(set(d) - _MAPPED_HF_KEYS - IGNORED_HF_KEYS)
    if unknown:
        raise CheckpointError(f"config.json has keys sambay does not understand: {short(str(unknown), 200)}")
    _check_hf_types(d)
    for key, want in (("hidden_act", "silu"), ("mlp_bias", False), ("lm_head_bias", False),
                      ("mamba_proj_bias", False), ("mamba_dt_rank", "auto")):
        if key in d and d[key] != want:
            raise CheckpointError(f"config.json {key}={short(repr(d[key]))} is not supported (the architecture "
                                  f"uses {want!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "sliding_window") if k not in d]
    if missing:
        raise CheckpointError(f"config.json lacks required keys: {missing}")
    checkpoint_dtype(d)
    n_layers = d["num_hidden_layers"]
    if n_layers > MAX_LAYERS:  # before the plan is built: 10^9 layers took minutes and gigabytes (issue 13)
        raise CheckpointError(f"config.json: num_hidden_layers is {n_layers}, more than sambay's bound of "
                              f"{MAX_LAYERS} layers")
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
        raise CheckpointError(_with_hf_names(str(e))) from None
    _check_layer_types(d.get("layer_types"), plan)
    return config


def _check_hf_types(d: dict) -> None:
    for key, (expected, test) in _HF_TYPES.items():
        if key in d and not test(d[key]):
            raise CheckpointError(f"config.json: {key} must be {expected}, got {short(repr(d[key]))}")


def _plan(d: dict, n_layers: int) -> tuple[LayerKind, ...]:
    if "sambay_plan" in d:
        kinds = {k.value: k for k in LayerKind}
        bad = [k for k in d["sambay_plan"] if k not in kinds]
        if bad:
            raise ValueError(f"sambay_plan has unknown layer kinds {short(repr(bad))}; known: {', '.join(kinds)}")
        plan = tuple(kinds[k] for k in d["sambay_plan"])
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
            raise CheckpointError(f"config.json {key}={short(repr(name))} is not supported; supported: "
                                  f"{', '.join(_DTYPES)} (sambay does not load quantised weights)")
    return next((_DTYPES[name] for name in declared.values()), None)


def _sliding_window(value) -> int:
    """The remote config class once stored a per-layer list (512 or None); every entry is the same window."""
    if isinstance(value, list):
        sizes = {v for v in value if v is not None}
        if len(sizes) != 1:
            raise CheckpointError(f"config.json: sliding_window list must hold exactly one window size, got "
                                  f"{short(str(sorted(sizes)))}")
        value = sizes.pop()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"config.json: sliding_window must be a positive int, got {value!r}")
    return value


def _check_layer_types(layer_types, plan: tuple[LayerKind, ...]) -> None:
    """HF's standard `layer_types` marks sliding layers; it must agree with the plan."""
    if layer_types is None:
        return
    expected = ["sliding_attention" if k is LayerKind.SLIDING_ATTENTION else "full_attention" for k in plan]
    if list(layer_types) != expected:
        raise CheckpointError("config.json: layer_types disagrees with the phi4flash layer layout")


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
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(parts))


def _check_shape(name: str, found: tuple, expected: tuple) -> None:
    if found != expected:
        raise CheckpointError(f"tensor {name} has shape {list(found)} but the model expects {list(expected)}")


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
    raw = parse_json(file.read_bytes(), str(file))
    return config_from_hf(raw), raw


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file} for a model directory (or a file in it); see `shard_files`."""
    return shard_files(model_directory(path))


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

    Every file is checked before any tensor is allocated: config.json's types and size bounds, the index's
    file names (inside the directory), every safetensors header (`sambay.safetensors_io.read_header`), and
    every tensor's presence, dtype and shape against the model config.json describes.

    Raises:
        FileNotFoundError: no config.json, no weights, or a shard named by the index is absent.
        CheckpointError: (a ValueError) a malformed or inconsistent file, unsupported config or
            ``torch_dtype``, or missing / unexpected / mis-shaped tensors; one line naming the file and field.
    """
    path = model_directory(path)
    config, raw = read_config(path)
    files = weight_files(path)
    headers = {file: read_header(file) for file in set(files.values())}
    _check_layer_count(config, files, path)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = SambaY(config, backend=backend)
    model.to_dtype(dtype or checkpoint_dtype(raw) or torch.float32)
    quantized = _quantized_pairs(model, path)
    pairs = name_pairs(model)
    _check_names(set(files), set(pairs) | set(quantized), config, where=f"checkpoint {path}")
    params = dict(model.named_parameters())
    by_file = check_tensors(files, headers, {hf: params[ours].shape for hf, ours in pairs.items()})
    tied_head = config.tie_embeddings and "lm_head.weight" in files
    if tied_head:  # compared with the embedding below, not loaded
        check_tensors(files, headers, {"lm_head.weight": model.embed.weight.shape})
    total = sum(file.stat().st_size for file in by_file)  # the bytes read, whatever dtype they become
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"loading {Path(path).name}", total=total)
        for file, names in by_file.items():
            for hf, value in read_tensors(headers[file], names):
                target = params[pairs[hf]]
                _assign(model, pairs[hf], value.to(device=device, dtype=target.dtype))
                bar.advance(task, value.numel() * value.element_size())
        bar.update(task, completed=total)  # the files' headers
    if quantized:
        from sambay.quant.format import load_quantized_tensors

        load_quantized_tensors(model, files, headers, quantized, device)
    if tied_head:
        [(_, head)] = read_tensors(headers[files["lm_head.weight"]], ["lm_head.weight"])
        _check_tied_head(head.to(device=device, dtype=model.embed.weight.dtype), model.embed.weight, str(path))
    return model.eval()


def _quantized_pairs(model: SambaY, path: Path) -> dict[str, str]:
    """With a ``quantization_config.json`` (`sambay.quant`): swap the projections for `QuantizedLinear` and
    return {checkpoint name: our name} of their int weights and scales; {} for a float checkpoint."""
    from sambay.quant.format import quantized_buffers, read_spec
    from sambay.quant.layer import apply_quantized_layers

    spec = read_spec(path)
    if spec is None:
        return {}
    try:
        apply_quantized_layers(model, spec)
    except ValueError as e:
        raise CheckpointError(f"{path}: quantization_config.json does not fit the model: {e}") from None
    return {hf_name(name, model.config): name for name in quantized_buffers(model)}


_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,6})\.")


def _check_layer_count(config: SambaYConfig, files: dict[str, Path], where: Path) -> None:
    """config.json's layer count against the layers the checkpoint's tensors name, before the model is built:
    a config that claims more layers is one message naming num_hidden_layers, not a model of empty layers
    and a list of a thousand missing tensors. (More layers in the checkpoint: `_check_names` lists them.)"""
    layers = {int(m[1]) for name in files if (m := _LAYER_NAME.match(name))}
    found = max(layers) + 1 if layers else 0
    if config.n_layers > found:
        raise CheckpointError(f"config.json: num_hidden_layers is {config.n_layers}, but the tensors of {where} "
                              f"are for {found} layers")


def _check_tied_head(head: Tensor, embed: Tensor, where: str) -> None:
    """A tied model reads its head from the embedding. An ``lm_head.weight`` stored beside it is ignored:
    silently when it is the embedding (some exports write both), with a warning when it is not, since
    then the checkpoint probably has an untied head that config.json mislabels."""
    if not torch.equal(head, embed):
        log.warning("%s: config.json says tie_word_embeddings: true, but the checkpoint's lm_head.weight differs "
                    "from the embedding; it is ignored and the head is the embedding. If the head was trained "
                    "separately, set \"tie_word_embeddings\": false in config.json.", where)


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
