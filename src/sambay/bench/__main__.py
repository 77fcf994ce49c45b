"""`python -m sambay.bench [--smoke] [--out DIR]`: run the benchmark suite and write its report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sambay.bench import report, suite


def main() -> int:
    p = argparse.ArgumentParser(prog="sambay bench", description=suite.__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for bench.json/.md/.png")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes: check the plumbing (CPU ok)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument("--long-new-tokens", type=int, default=32768)
    args = p.parse_args()
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


if __name__ == "__main__":
    raise SystemExit(main())
