"""The quantised checkpoint on disk: ``quantization_config.json`` beside a normal config.json, and the
int8 / uint8 / fp32 tensors of each `QuantizedLinear` (``<projection>.qweight``, ``<projection>.scales``)
in place of its ``<projection>.weight``. Everything else is stored as in a float checkpoint.

    quantization_config.json = {"format": "sambay-rtn", "bits": 4, "group_size": 128}

Tensors are read with the hardened reader's validated headers (`sambay.safetensors_io`); never a pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sambay.quant.layer import QUANT_FILE, QuantizedLinear, QuantSpec
from sambay.safetensors_io import CheckpointError, Header, parse_json, short

FORMAT = "sambay-rtn"
# the safetensors dtype each quantised tensor must have
_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32}


def read_spec(directory: Path) -> QuantSpec | None:
    """The `QuantSpec` of a model directory's ``quantization_config.json``; None when it has none."""
    file = directory / QUANT_FILE
    if not file.is_file():
        return None
    d = parse_json(file.read_bytes(), str(file))
    if not isinstance(d, dict) or d.get("format") != FORMAT or set(d) != {"format", "bits", "group_size"}:
        raise CheckpointError(f"{file}: expected {{\"format\": \"{FORMAT}\", \"bits\": 8 or 4, \"group_size\": N}}, "
                              f"got {short(json.dumps(d), 120)}")
    if not all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ("bits", "group_size")):
        raise CheckpointError(f"{file}: bits and group_size must be ints")
    try:
        return QuantSpec(bits=d["bits"], group_size=d["group_size"])
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def write_spec(directory: Path, spec: QuantSpec) -> None:
    tmp = directory / f".{QUANT_FILE}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "bits": spec.bits, "group_size": spec.group_size}, indent=2) + "\n")
    os.replace(tmp, directory / QUANT_FILE)


def quantized_buffers(model: nn.Module) -> dict[str, Tensor]:
    """{our name: tensor} of every qweight and scales buffer of ``model``."""
    return {f"{path}.{leaf}": getattr(m, leaf) for path, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for leaf in ("qweight", "scales")}


def load_quantized_tensors(model: nn.Module, files: dict[str, Path], headers: dict[Path, Header],
                           pairs: dict[str, str], device: torch.device) -> None:
    """Check, then read the quantised tensors ``pairs`` ({checkpoint name: our name}) into ``model``.

    Raises:
        CheckpointError: a tensor with another dtype or shape than the model's quantisation expects.
    """
    expected = quantized_buffers(model)
    for hf, ours in pairs.items():
        entry, want = headers[files[hf]].tensors.get(hf), expected[ours]
        if entry is None:
            raise CheckpointError(f"{files[hf]}: tensor {hf} is listed in the index but absent from the file")
        if _DTYPES.get(entry.dtype) != want.dtype or entry.shape != tuple(want.shape):
            raise CheckpointError(f"{files[hf]}: tensor {hf} is {entry.dtype} {list(entry.shape)}, but the "
                                  f"quantization_config.json expects {want.dtype} {list(want.shape)}")
    for hf, ours in pairs.items():
        header = headers[files[hf]]
        entry = header.tensors[hf]
        tensor = torch.empty(entry.shape, dtype=_DTYPES[entry.dtype])
        with open(header.file, "rb") as f:
            f.seek(header.data_start + entry.begin)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != entry.end - entry.begin:
                raise CheckpointError(f"{header.file}: truncated while reading tensor {hf!r}")
        path, leaf = ours.rsplit(".", 1)
        setattr(model.get_submodule(path), leaf, tensor.to(device))


def save_quantized(model: nn.Module, spec: QuantSpec, directory: str | os.PathLike) -> None:
    """Write a quantised ``model``: config.json, one ``model.safetensors``, quantization_config.json."""
    from sambay.checkpoint import _write_json, config_to_hf, hf_name, to_hf_state_dict

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    state.update({hf_name(name, model.config): t for name, t in quantized_buffers(model).items()})
    tmp = root / ".model.safetensors.tmp"
    save_file({k: v.to("cpu").contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, root / "model.safetensors")
    write_spec(root, spec)
    _write_json(root / "config.json", config_to_hf(model.config, torch_dtype=model.dtype))
