"""Plot the serving sweep (`benchmarks/serve_sweep.py` JSON): throughput and latency against concurrency.

    python3 benchmarks/plot_sweep.py docs/results/sweep-sambay-2k8k.json docs/results/sweep-transformer-2k4k.json \
        --out docs/results/serve-sweep.png

Left: output tokens/s through `sambay serve`, the offline fixed-context decode step at the same batch
and context, and the bandwidth limit. Right: inter-token latency p50 and time to first token p50.
Needs matplotlib (``pip install 'sambay[plot]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the file backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for path in args.results:
        result = json.loads(path.read_text())
        runs = result["runs"]
        label = f"{result['arch']} ({result['prompt_tokens'] // 1024}K + {result['max_tokens'] // 1024}K)"
        c = [r["concurrency"] for r in runs]
        marker = "o" if result["arch"] == "sambay" else "s"
        tput.plot(c, [r["output_tokens_per_s"] for r in runs], marker=marker, label=f"{label}: served")
        offline = [(r["concurrency"], r["offline_step"]["output_tokens_per_s"]) for r in runs
                   if r.get("offline_step", {}).get("output_tokens_per_s")]
        if offline:
            tput.plot(*zip(*offline, strict=True), marker=marker, linestyle="--", label=f"{label}: offline step")
        limits = [(r["concurrency"], r["bandwidth_limit"]["limit_output_tokens_per_s"]) for r in runs
                  if "bandwidth_limit" in r]
        if limits:
            tput.plot(*zip(*limits, strict=True), marker=marker, linestyle=":", label=f"{label}: bandwidth limit")
        lat.plot(c, [r["itl_ms"]["p50"] for r in runs], marker=marker, label=f"{label}: inter-token p50")
        lat.plot(c, [r["ttft_ms"]["p50"] for r in runs], marker=marker, linestyle="--", label=f"{label}: TTFT p50")
    tput.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="output tokens/s",
             title="Throughput, one H200, bf16")
    lat.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="ms", title="Latency")
    for ax in (tput, lat):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
