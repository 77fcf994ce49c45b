"""The quantised checkpoint on disk: ``quantization_config.json`` beside a normal config.json, and the
int8 / uint8 / fp32 tensors of each `QuantizedLinear` in place of its ``<projection>.weight``. Everything
else (norms, embedding, biases, Mamba's x_proj / dt_proj, ...) is stored as in a float checkpoint.

    quantization_config.json = {"format": "sambay-rtn", "bits": 4, "group_size": 128}
                            or {"format": "sambay-awq", "bits": 4, "group_size": 128}

    <projection>.qweight      int8 (n_out, n_in) at 8 bits, uint8 (n_out, n_in // 2) at 4 bits
    <projection>.scales       fp32 (n_out, n_in // group_size)
    <projection>.input_scale  fp32 (n_in,), "sambay-awq" only: 1/s, every value finite and > 0

The qweight / scales layout is `sambay.ops.quantized_matmul`'s. A "sambay-awq" projection computes
y = (x * input_scale) Wq^T, where Wq = dequantise(qweight, scales) ≈ W diag(s): the activation-aware scale
s (`sambay.quant.awq`) is multiplied into W before rounding and divided out of x at run time.

Why a stored input scale rather than folding 1/s into the preceding op (AWQ's own choice): the fold is
exact only where the preceding op ends in a per-channel affine map that feeds nothing else. That holds
for the projections after a block's LayerNorm (weight and bias scaled) and for the MLP's out_proj (the
up half of in_proj), but not for the attention out_proj (a head-wise norm sits between V and it), Mamba's
out_proj (the scan output gated by silu(z)) or the GMU's (the shared memory gated by silu(in_proj x));
folding would also tie the checkpoint to each block's internals. One (n_in,) fp32 vector per projection
is always exact, costs 4 bytes an input (under 0.1% of an int4 weight at n_out = 2560) and one
elementwise multiply a call, and the float tensors stay as released. A "sambay-rtn" checkpoint has no
input_scale and loads as before; a missing, mis-shaped, mis-typed or non-positive input_scale is a
`CheckpointError` naming the tensor.

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

# quantization_config.json "format" → whether the projections carry an input_scale
FORMATS = {"sambay-rtn": False, "sambay-awq": True}
# the safetensors dtype each quantised tensor must have
_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "F32": torch.float32}


def read_spec(directory: Path) -> QuantSpec | None:
    """The `QuantSpec` of a model directory's ``quantization_config.json``; None when it has none."""
    file = directory / QUANT_FILE
    if not file.is_file():
        return None
    d = parse_json(file.read_bytes(), str(file))
    known = isinstance(d, dict) and isinstance(d.get("format"), str) and d["format"] in FORMATS
    if not known or set(d) != {"format", "bits", "group_size"}:
        raise CheckpointError(f"{file}: expected {{\"format\": \"sambay-rtn\" or \"sambay-awq\", \"bits\": 8 or 4, "
                              f"\"group_size\": N}}, got {short(json.dumps(d), 120)}")
    if not all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ("bits", "group_size")):
        raise CheckpointError(f"{file}: bits and group_size must be ints")
    try:
        return QuantSpec(bits=d["bits"], group_size=d["group_size"], input_scale=FORMATS[d["format"]])
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def write_spec(directory: Path, spec: QuantSpec) -> None:
    tmp = directory / f".{QUANT_FILE}.tmp"
    fmt = "sambay-awq" if spec.input_scale else "sambay-rtn"
    tmp.write_text(json.dumps({"format": fmt, "bits": spec.bits, "group_size": spec.group_size}, indent=2) + "\n")
    os.replace(tmp, directory / QUANT_FILE)


def quantized_buffers(model: nn.Module) -> dict[str, Tensor]:
    """{our name: tensor} of every qweight, scales and (AWQ) input_scale buffer of ``model``."""
    return {f"{path}.{leaf}": getattr(m, leaf) for path, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for leaf in ("qweight", "scales", "input_scale") if getattr(m, leaf) is not None}


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
        if leaf == "input_scale" and not bool((torch.isfinite(tensor) & (tensor > 0)).all()):
            raise CheckpointError(f"{header.file}: tensor {hf} must be finite and positive (it divides out the "
                                  "activation-aware scale)")
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
