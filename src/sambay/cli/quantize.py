"""`sambay quantize SRC DST --bits 8|4 [--group-size 128] [--calibration FILE.txt]`: weight-only quantisation.

    sambay quantize Phi-4-mini-flash-reasoning phi4-int4/ --bits 4
    sambay quantize Phi-4-mini-flash-reasoning phi4-int4-awq/ --bits 4 --calibration calib.txt
    sambay generate --model phi4-int4/ "..."          loads like any other checkpoint

The big projections (attention, Mamba, GMU and MLP in/out projections) become int8, or int4 packed two a
byte, with one fp32 scale per output row and ``--group-size`` inputs (symmetric, no zero point). The
embedding, LM head, norms and Mamba's x_proj / dt_proj stay in SRC's dtype. With ``--calibration``, the
float model first reads the first ``--calibration-tokens`` tokens of the text file (SRC's tokenizer), and
each projection gets an activation-aware input scale (AWQ, `sambay.quant.awq`; stored as ``input_scale``,
format "sambay-awq"). It is offered at 4 bits only, where it was measured to help (benchmarks/
quant_quality.py, embedded model, held-out text): KL to the float model 0.107 → 0.061 nats, top-1
agreement 91.8% → 94.3%; at 8 bits the KL went up (1.3e-4 → 3.4e-4). Without it, plain round-to-nearest.
DST gets ``model.safetensors``, ``config.json``, ``quantization_config.json`` and SRC's tokenizer and
generation files. The layout is documented in `sambay.quant.format` and the README.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "quantise a checkpoint's weights to int8 or int4 (per-group scales; AWQ with --calibration)"
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="model directory in the released (float) format")
    parser.add_argument("dst", metavar="DST", help="output model directory (new or empty)")
    parser.add_argument("--bits", type=int, required=True, choices=[8, 4], help="weight bits")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per scale (default 128)")
    parser.add_argument("--calibration", metavar="FILE.txt",
                        help="text for an activation-aware scale search (AWQ); default: round-to-nearest")
    parser.add_argument("--calibration-tokens", type=int, default=4096, metavar="N",
                        help="calibration tokens read from FILE.txt (default 4096)")


def main(args: argparse.Namespace) -> int:
    import torch

    from sambay.checkpoint import load_model, model_directory
    from sambay.cli._common import UsageError
    from sambay.quant import QuantSpec, quantize_model
    from sambay.quant.format import read_spec, save_quantized

    src, dst = model_directory(args.src), Path(args.dst)
    try:
        spec = QuantSpec(bits=args.bits, group_size=args.group_size, input_scale=args.calibration is not None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.calibration is not None and args.bits != 4:  # measured: see the module docstring
        raise UsageError("--calibration (AWQ) is offered at --bits 4 only: at 8 bits it did not lower the error")
    if args.calibration_tokens < 1:
        raise UsageError(f"--calibration-tokens must be at least 1, got {args.calibration_tokens}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"DST {dst} exists and is not an empty directory")
    existing = read_spec(src)
    if existing is not None:
        raise ValueError(f"{src} is already quantised ({existing.bits}-bit, group size {existing.group_size}); "
                         "quantise the float checkpoint it came from")
    ids = _calibration_ids(src, args) if spec.input_scale else None  # read before minutes of loading
    model = load_model(src, backend="reference")
    with torch.no_grad():
        layers = _calibrated(model, spec, ids, args) if spec.input_scale else quantize_model(model, spec)
    save_quantized(model, spec, dst)
    for name in _COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    print(f"quantised {len(layers)} projections of {src} to {spec.bits} bits (group size {spec.group_size}): "
          f"wrote {dst} ({size / 2**20:.1f} MiB of weights)")
    return 0


def _calibration_ids(src: Path, args: argparse.Namespace) -> list[int]:
    """The --calibration text as SRC's token ids; an unreadable file is a usage error."""
    from sambay.cli._common import UsageError
    from sambay.tokenizer import load_tokenizer

    try:
        text = Path(args.calibration).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--calibration {args.calibration}: cannot read it as UTF-8 text ({e})") from None
    ids = load_tokenizer(src).encode(text)
    if not ids:
        raise UsageError(f"--calibration {args.calibration} is empty")
    return ids


def _calibrated(model, spec, ids: list[int], args: argparse.Namespace) -> dict:
    """AWQ: calibrate on --calibration, search the scales, quantise; prints the layer error it saved."""
    from sambay.quant.awq import calibration_sequences, quantize_model_awq

    sequences = calibration_sequences(ids, args.calibration_tokens, seq_len=min(512, model.config.max_seq_len))
    found = quantize_model_awq(model, spec, sequences)
    rtn = sum(r.rtn_error for r in found.values()) / len(found)
    awq = sum(r.error for r in found.values()) / len(found)
    print(f"calibrated on {sequences.numel()} tokens of {args.calibration}: mean relative output error of a "
          f"projection {rtn:.2e} (round-to-nearest) -> {awq:.2e} (scaled)")
    return found
