"""Measure peak memory and time of `sambay.load_model` on a full-size checkpoint in the released format.

Writes a randomly initialised model of a preset (default: the released 3.85B configuration, bf16 with
A_log and λ in fp32, two shards like the release) to a directory, then loads it in a fresh process and
reports the loader's peak resident memory against the checkpoint size. A loader that materialised a
second full copy would peak at about twice the checkpoint size.

    python benchmarks/load_memory.py --out /tmp/phi4flash-random
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_random(preset: str, out: Path) -> None:
    from sambay import PRESETS, SambaY, save_model

    model = SambaY(PRESETS[preset], backend="reference").to_dtype(torch.bfloat16)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, out, max_shard_bytes=5 * 2**30)


def load_and_report(path: Path) -> None:
    import sambay

    start = time.perf_counter()
    model = sambay.load_model(path, device="cpu")
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(seconds, 1), "param_bytes": params, "peak_rss_bytes": peak,
                      "peak_over_params": round(peak / params, 3)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="phi4-mini-flash")
    p.add_argument("--out", type=Path, default=Path("/tmp/sambay-random-checkpoint"))
    p.add_argument("--load-only", action="store_true", help="(internal) load --out and report")
    args = p.parse_args()
    if args.load_only:
        load_and_report(args.out)
        return 0
    if not (args.out / "model.safetensors.index.json").exists():
        write_random(args.preset, args.out)
    return subprocess.call([sys.executable, __file__, "--out", str(args.out), "--load-only"])


if __name__ == "__main__":
    raise SystemExit(main())
