"""`sambay bench`: decode, prefill and long-generation throughput of our engine against baselines and the
hardware limit, in one run (see `sambay.bench`). Writes bench.json, bench.md and bench.png."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "benchmark the engine against baselines and the hardware limit (needs a GPU for real numbers)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for bench.json/.md/.png")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: check the plumbing (CPU ok)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument("--long-new-tokens", type=int, default=32768, help="tokens of the real long generation")


def main(args: argparse.Namespace) -> int:
    from sambay.bench import report, suite

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.smoke:
        bench = suite.BenchConfig(batches=(1, 2), largest_batch=4, contexts=(16, 40), prefill_tokens=(16, 64),
                                  decode_steps=2, long_prompt=8, long_new_tokens=8, hf=not args.no_hf,
                                  smoke=True, reference_contexts=(16,))
    else:
        bench = suite.BenchConfig(hf=not args.no_hf, long_new_tokens=args.long_new_tokens)
    result = suite.run(bench, checkpoint=lambda partial: report.write(partial, args.out))
    print(report.write(result, args.out))
    return 0
