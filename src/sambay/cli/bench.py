"""`sambay bench`: decode, prefill and long-generation throughput of our engine against baselines and the
hardware limit, in one run (see `sambay.bench`). Writes bench.json, bench.md and bench.png.

    sambay bench --out bench-out        on a CUDA GPU: the released 3.85B configuration (about an hour)
    sambay bench --smoke                anywhere, in seconds: a tiny model, to check the plumbing
    sambay bench --formats bf16 int8 int4 [--compile]
                                        weight formats side by side (decode at batch 1, 8, 64 and 2K / 32K
                                        context, prefill), each against the limit its own bytes set

The plot needs matplotlib (pip install 'sambay[plot]'); the HF baselines need transformers.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from sambay.cli._common import UsageError

HELP = "benchmark the engine against baselines and the hardware limit (needs a GPU for real numbers)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory for bench.json/.md/.png (default: bench-out)")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: check the plumbing (CPU ok)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run the full benchmark without a GPU anyway (the 3.85B model at about 1 token/s: hours)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument("--long-new-tokens", type=int, default=32768,
                   help="tokens of the real long generation (default: 32768)")
    p.add_argument("--formats", nargs="+", choices=("bf16", "bf16-gemv", "int8", "int4"), metavar="FORMAT",
                   help="compare these weight formats (bf16 bf16-gemv int8 int4) instead of running the full suite; "
                        "bf16-gemv: bf16 with batch-1 projections on our GEMV kernel instead of cuBLAS")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale of int8/int4 (default: 128)")
    p.add_argument("--compile", action="store_true",
                   help="with --formats: also time the torch.compile'd decode step under the CUDA graph")


def _suite_config(args: argparse.Namespace):
    from sambay.bench import suite

    if args.smoke:
        return suite.BenchConfig(batches=(1, 2), largest_batch=4, contexts=(16, 40), prefill_tokens=(16, 64),
                                 decode_steps=2, long_prompt=8, long_new_tokens=8, hf=not args.no_hf,
                                 smoke=True, reference_contexts=(16,))
    return suite.BenchConfig(hf=not args.no_hf, long_new_tokens=args.long_new_tokens)


def _formats_config(args: argparse.Namespace):
    from sambay.bench import suite

    if args.smoke:
        return suite.FormatsConfig(formats=tuple(args.formats), group_size=16, batches=(1, 2), contexts=(16,),
                                   prefill_tokens=(16,), decode_steps=2, smoke=True, compile=args.compile)
    _check_group_size(args.group_size, args.formats)
    return suite.FormatsConfig(formats=tuple(args.formats), group_size=args.group_size, compile=args.compile)


def _check_group_size(group_size: int, formats) -> None:
    """A group size that does not fit the release's projections is refused now, not after the bf16 rows."""
    from sambay.config import PHI4_MINI_FLASH
    from sambay.model.sambay import SambaY
    from sambay.ops.quantized_matmul import check_quant_args
    from sambay.quant.layer import projections

    with torch.device("meta"):
        model = SambaY(PHI4_MINI_FLASH, backend="reference")
    try:
        for bits in {8 if f == "int8" else 4 for f in formats if f.startswith("int")}:
            for path, linear in projections(model):
                check_quant_args(linear.in_features, bits, group_size, path)
    except ValueError as e:
        raise UsageError(f"--group-size {group_size}: {e}") from None


def main(args: argparse.Namespace) -> int:
    from sambay.bench import report, suite

    if not (args.smoke or args.allow_cpu or torch.cuda.is_available()):
        raise UsageError("no CUDA GPU: the full benchmark would run the 3.85B model on the CPU at about 1 token/s "
                         "for hours; use --smoke for a quick check of the plumbing (or --allow-cpu to run it anyway)")
    if args.compile and not args.formats:
        raise UsageError("--compile is a column of the --formats comparison: add --formats bf16 (int8 int4)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("sambay.bench")
    if not report.can_plot():  # say it now, not after the run
        log.warning("matplotlib is not installed: bench.png will not be written (pip install 'sambay[plot]')")
    save = lambda partial: report.write(partial, args.out)  # noqa: E731  (a run cut short keeps its numbers)
    if args.formats:
        result = suite.run_formats(_formats_config(args), checkpoint=save)
    else:
        result = suite.run(_suite_config(args), checkpoint=save)
    markdown, notes = report.write(result, args.out)
    print(markdown)
    print("", *notes, sep="\n")
    return 0
