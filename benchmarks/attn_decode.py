"""The differential-attention decode kernel at the release's shapes (issue 14): a sweep of its launch knobs.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/attn_decode.py --out results/attn-decode.json

Why: at batch 1, going from a 2K to a 32K context adds 0.93 ms to a decode step (`sambay bench`,
2026-12-02), while the extra K/V bytes the nine layers that read the shared K/V move need about 0.35 ms at
the bandwidth limit: the decode kernel streams long contexts at about a third of it. Each case is one
`sambay.ops.triton.attention.diff_attention` call at t = 1 (40 query heads, 20 kv heads, head_dim 64,
the full-attention layer's static cache with ``kv_len``), timed as a CUDA graph of ``--calls`` calls
(one K/V: the cross-decoder's layers all read the same shared K/V, so a 2K context stays in L2 as it does
in the model). Every setting of the module's knobs (BLOCK_N_DECODE, TARGET_PROGRAMS,
MIN_BLOCKS_PER_SPLIT, DECODE_WARPS, DECODE_STAGES) is checked against the current default's output, then
timed; the report gives each case's best setting, the default's time, and the setting with the least
time summed over the cases relative to each case's best, with the K/V bandwidth against 4.3 TB/s.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from sambay.bench.hardware import graphed_seconds
from sambay.bench.sweep import sweep_knobs
from sambay.ops.triton import attention as tri

LIMIT = 4.3e12
HEADS, KV_HEADS, HEAD_DIM = 40, 20, 64
GRID = {"BLOCK_N_DECODE": (32, 64, 128), "TARGET_PROGRAMS": (1024, 2048, 4096),
        "MIN_BLOCKS_PER_SPLIT": (1, 2, 4), "DECODE_WARPS": (2, 4, 8), "DECODE_STAGES": (2, 3, 4)}
CASES = ((1, 2048), (1, 8192), (1, 32768), (8, 8192), (8, 32768), (64, 2048), (64, 32768))


def case_inputs(b: int, s: int, dev: torch.device) -> tuple:
    g = torch.Generator(device=dev).manual_seed(b * 100_003 + s)

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g).bfloat16()

    q, k, v = rnd(b, HEADS, 1, HEAD_DIM), rnd(b, KV_HEADS, s, HEAD_DIM), rnd(b, KV_HEADS, s, HEAD_DIM)
    q_pos = torch.full((b, 1), s - 1, device=dev, dtype=torch.long)
    k_pos = torch.arange(s, device=dev).expand(b, s).contiguous()
    kv_len = torch.full((b,), s, device=dev, dtype=torch.long)
    lambdas = [torch.randn(HEAD_DIM, device=dev, generator=g) * 0.1 for _ in range(4)]
    w = torch.ones(2 * HEAD_DIM, device=dev, dtype=torch.bfloat16)
    return (q, k, v, q_pos, k_pos, None, *lambdas, 0.5, w, 1e-5, kv_len)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=16, help="calls per graph (16: a decode step's attention calls)")
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--out")
    args = p.parse_args()
    dev = torch.device("cuda")
    defaults = {name: getattr(tri, name) for name in GRID}
    cases = {f"{b}x{s}": partial(tri.diff_attention, *case_inputs(b, s, dev)) for b, s in CASES}
    kv_bytes = {(b, s): 2 * b * KV_HEADS * s * HEAD_DIM * 2 for b, s in CASES}
    rows = sweep_knobs(tri, GRID, cases, lambda fn: graphed_seconds(fn, args.calls) * 1e6, "us", args.max_seconds)
    if "error" in rows[0]:  # every comparison is against the default: without it there is no report
        print(f"the default setting failed: {rows[0]['error']}")
        return 1
    done = [r for r in rows if "error" not in r]
    result = {"cases": [f"{b}x{s}" for b, s in CASES], "default": defaults, "settings_timed": len(rows),
              "rows": rows, "best": {}}
    for b, s in CASES:
        key = f"{b}x{s}"
        best = min(done, key=lambda r: r["us"][key])
        result["best"][key] = {"us": best["us"][key], "default_us": done[0]["us"][key],
                               "fraction_of_limit": kv_bytes[b, s] / LIMIT / (best["us"][key] / 1e6),
                               "setting": {n: best[n] for n in GRID}}
        print(f"{key}: default {done[0]['us'][key]:.1f} us, best {best['us'][key]:.1f} us "
              f"({result['best'][key]['fraction_of_limit']:.0%} of the limit) with {result['best'][key]['setting']}")
    floor = {k: v["us"] for k, v in result["best"].items()}
    overall = min(done, key=lambda r: sum(r["us"][k] / floor[k] for k in floor))
    result["overall"] = {n: overall[n] for n in GRID} | {"us": overall["us"]}
    print("best overall:", result["overall"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
