"""`sambay quantize SRC DST --bits 8|4 [--group-size 128]`: weight-only round-to-nearest quantisation.

    sambay quantize Phi-4-mini-flash-reasoning phi4-int4/ --bits 4
    sambay generate --model phi4-int4/ "..."          loads like any other checkpoint

The big projections (attention, Mamba, GMU and MLP in/out projections) become int8, or int4 packed two a
byte, with one fp32 scale per output row and ``--group-size`` inputs (symmetric, no zero point). The
embedding, LM head, norms and Mamba's x_proj / dt_proj stay in SRC's dtype. DST gets ``model.safetensors``,
``config.json``, ``quantization_config.json`` and SRC's tokenizer and generation files. The layout is
documented in `sambay.ops.quantized_matmul` and the README.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "quantise a checkpoint's weights to int8 or int4 (round-to-nearest, per-group scales)"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="model directory in the released (float) format")
    parser.add_argument("dst", metavar="DST", help="output model directory (new or empty)")
    parser.add_argument("--bits", type=int, required=True, choices=[8, 4], help="weight bits")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per scale (default 128)")


def main(args: argparse.Namespace) -> int:
    import torch

    from sambay.checkpoint import load_model, model_directory
    from sambay.cli._common import UsageError
    from sambay.quant import QuantSpec, quantize_model
    from sambay.quant.format import read_spec, save_quantized

    src, dst = model_directory(args.src), Path(args.dst)
    try:
        spec = QuantSpec(bits=args.bits, group_size=args.group_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"DST {dst} exists and is not an empty directory")
    existing = read_spec(src)
    if existing is not None:
        raise ValueError(f"{src} is already quantised ({existing.bits}-bit, group size {existing.group_size}); "
                         "quantise the float checkpoint it came from")
    model = load_model(src, backend="reference")
    with torch.no_grad():
        layers = quantize_model(model, spec)
    save_quantized(model, spec, dst)
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"quantised {len(layers)} projections of {src} to {spec.bits} bits (group size {spec.group_size}): "
          f"wrote {dst} ({size / 2**20:.1f} MiB of weights)")
    return 0
