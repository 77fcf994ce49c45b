"""The attention prefill kernel at the release's shapes (issue 14's 32K-prefill target): a sweep of its launch
knobs, against PyTorch's SDPA on plain causal attention of the same shape.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/attn_prefill.py --out results/attn-prefill.json

Why: the profile of a 1 x 32K prefill (`sambay bench --formats bf16`, 2026-12-02) puts 135.5 ms of its 370 ms
of kernel time in `_prefill`, the attention prefill kernel, over 9 calls (8 sliding-window layers and the
full-attention layer), while the full layer's causal FLOPs need about 10 ms at the bf16 matmul rate.

Cases, as the model calls the kernel at batch 1 (40 query heads, 20 kv heads, head_dim 64, queries a transposed
view of (b, t, heads, hd), keys and values contiguous (b, kv heads, keys, hd)):
- ``full-T``: the full-attention layer, causal over T keys, no cache before them;
- ``swa-T``: a sliding-window layer (window 512) of the first chunk: an empty 512-slot ring (positions -1)
  before the call's own T keys;
- ``full-512-after-1536`` and ``swa-512-after-1536``: the last 512-token chunk of a served 2K prompt, after
  the 1,536 cached keys (full layer) or a full ring (windowed layers).
For each whole prefill call (32K, 2K, the served chunk: 1 full + 8 windowed calls) the report names the
setting with the least time, next to the default's.
Every setting of the module's knobs (BLOCK_M, BLOCK_N, PREFILL_WARPS, PREFILL_STAGES) is checked against the
first setting's output (the defaults) and timed (median of ``--reps`` calls after a warm-up); "useful" FLOPs
count the visible (query, key) pairs only: per pair and differential unit, two q·k products of head_dim and
two p·[V1 | V2] products of 2 head_dim, 2 FLOPs a multiply-add. The baseline of the same run: PyTorch's SDPA
(whichever backend it picks; bf16, causal, ``enable_gqa``) on plain 40-head attention of the same T, in TFLOP/s
(4 head_dim FLOPs per visible pair and head): what a mature kernel reaches on this shape.

``--model`` times what a user sees instead: the release's configuration (random weights, bf16) prefilling
1 x 2K and 1 x 32K tokens (`sambay bench`'s prefill rows, against the measured matmul rate), at the module's
defaults and, as the same run's baseline, at the kernel's earlier launch setting (64 x 64, 8 warps, 3
stages), each with the 32K prefill's profile by kernel family.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F

from sambay.bench.hardware import median_seconds
from sambay.bench.sweep import sweep_knobs
from sambay.ops.triton import attention as tri

RATE = 790e12
HEADS, KV_HEADS, HEAD_DIM, WINDOW, RING = 40, 20, 64, 512, 512
GRID = {"BLOCK_M": (64, 128), "BLOCK_N": (32, 64, 128), "PREFILL_WARPS": (4, 8), "PREFILL_STAGES": (2, 3, 4)}
# (kind, t, start): t queries at positions start .. start + t - 1. start 0: a prompt's first chunk (an empty
# ring before a windowed layer's keys); start > 0: a later chunk of a served prompt, its cached keys first
CASES = (("full", 32768, 0), ("swa", 32768, 0), ("full", 2048, 0), ("swa", 2048, 0), ("full", 512, 1536),
         ("swa", 512, 1536))
# what a whole prefill call of the model runs: 1 full-attention and 8 sliding-window layers
PREFILLS = {"32k": (32768, 0), "2k": (2048, 0), "chunk_512_after_1536": (512, 1536)}


def case_name(kind: str, t: int, start: int) -> str:
    return f"{kind}-{t}" + (f"-after-{start}" if start else "")


def case_inputs(kind: str, t: int, start: int, dev: torch.device) -> tuple:
    g = torch.Generator(device=dev).manual_seed(t + start + (kind == "swa"))

    def rnd(*shape):
        return torch.randn(*shape, device=dev, generator=g).bfloat16()

    q = rnd(1, t, HEADS, HEAD_DIM).transpose(1, 2)
    before = RING if kind == "swa" else start  # a windowed layer keeps a ring; the full layer every cached key
    k, v = rnd(1, KV_HEADS, before + t, HEAD_DIM), rnd(1, KV_HEADS, before + t, HEAD_DIM)
    q_pos = torch.arange(start, start + t, device=dev).view(1, t)
    cached = torch.arange(start - before, start, device=dev).view(1, before)
    k_pos = torch.cat([torch.where(cached >= 0, cached, -1), q_pos], dim=1)
    lambdas = [torch.randn(HEAD_DIM, device=dev, generator=g) * 0.1 for _ in range(4)]
    w = torch.ones(2 * HEAD_DIM, device=dev, dtype=torch.bfloat16)
    return (q, k, v, q_pos, k_pos, WINDOW if kind == "swa" else None, *lambdas, 0.5, w, 1e-5)


def visible_pairs(kind: str, t: int, start: int) -> int:
    return sum(p + 1 if kind == "full" else min(p + 1, WINDOW) for p in range(start, start + t))


def useful_flops(kind: str, t: int, start: int) -> float:
    units = HEADS // 2
    return visible_pairs(kind, t, start) * units * (2 * 2 * HEAD_DIM + 2 * 2 * 2 * HEAD_DIM)


def sdpa_baseline(t: int, reps: int, dev: torch.device) -> dict:
    g = torch.Generator(device=dev).manual_seed(7)
    q = torch.randn(1, HEADS, t, HEAD_DIM, device=dev, generator=g).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, t, HEAD_DIM, device=dev, generator=g).bfloat16() for _ in range(2))
    s = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), reps)
    flops = t * (t + 1) // 2 * HEADS * 4 * HEAD_DIM
    return {"t": t, "ms": s * 1e3, "tflops": flops / s / 1e12, "fraction_of_rate": flops / s / RATE}


EARLIER = {"BLOCK_M": 64, "BLOCK_N": 64, "PREFILL_WARPS": 8, "PREFILL_STAGES": 3}


def model_prefill(tokens: list[int]) -> dict:
    """``--model``: the release-shaped model's prefill rows and 32K profile, at the defaults and at EARLIER."""
    from sambay.bench import hardware
    from sambay.bench.profile import prefill_profile
    from sambay.bench.suite import _build, _prefill_rows
    from sambay.config import PHI4_MINI_FLASH

    rate = hardware.measure()["bf16_flops_per_s"]
    model = _build(PHI4_MINI_FLASH, "auto")
    defaults = {name: getattr(tri, name) for name in GRID}
    result = {"bf16_flops_per_s": rate}
    for label, setting in (("earlier", EARLIER), ("default", defaults)):
        for name, value in setting.items():
            setattr(tri, name, value)
        rows = _prefill_rows(label, model, tokens, rate)
        prof = prefill_profile(model, tokens[-1])
        result[label] = {"setting": setting, "rows": rows, "profile": prof}
        for r in rows:
            print(f"{label}: prefill 1 x {r['context']}: {r['seconds'] * 1e3:.1f} ms, "
                  f"{r['fraction_of_matmul_rate']:.1%} of the matmul rate", flush=True)
        print(f"{label}: {tokens[-1]} profile by family (ms):",
              {k: round(v, 1) for k, v in prof["families"].items()}, flush=True)
    for name, value in defaults.items():
        setattr(tri, name, value)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=150.0)
    p.add_argument("--model", action="store_true", help="time the release-shaped model's prefill instead")
    p.add_argument("--out")
    args = p.parse_args()
    if args.model:
        result = model_prefill([2048, 32768])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    dev = torch.device("cuda")
    defaults = {name: getattr(tri, name) for name in GRID}
    cases = {case_name(*c): partial(tri.diff_attention, *case_inputs(*c, dev)) for c in CASES}
    baseline = [sdpa_baseline(t, args.reps, dev) for t in sorted({t for _, t, start in CASES if not start})]
    for row in baseline:
        print(f"sdpa plain causal {row['t']}: {row['ms']:.2f} ms, {row['tflops']:.0f} TFLOP/s "
              f"({row['fraction_of_rate']:.0%} of {RATE / 1e12:.0f})", flush=True)
    rows = sweep_knobs(tri, GRID, cases, lambda fn: median_seconds(fn, args.reps) * 1e3, "ms", args.max_seconds,
                       on_row=lambda row: print(json.dumps(row), flush=True))
    if "error" in rows[0]:
        print(f"the default setting failed: {rows[0]['error']}")
        return 1
    done = [r for r in rows if "error" not in r]
    result = {"cases": [case_name(*c) for c in CASES], "default": defaults, "settings_timed": len(rows),
              "sdpa_plain_causal": baseline, "rows": rows, "best": {}}
    for kind, t, start in CASES:
        key = case_name(kind, t, start)
        best = min(done, key=lambda r: r["ms"][key])
        flops = useful_flops(kind, t, start)
        result["best"][key] = {"ms": best["ms"][key], "default_ms": done[0]["ms"][key],
                               "useful_tflops": flops / best["ms"][key] / 1e9,
                               "fraction_of_rate": flops / (best["ms"][key] / 1e3) / RATE,
                               "setting": {n: best[n] for n in GRID}}
        print(f"{key}: default {done[0]['ms'][key]:.2f} ms, best {best['ms'][key]:.2f} ms "
              f"({result['best'][key]['fraction_of_rate']:.0%} of the rate) with {result['best'][key]['setting']}")
    for label, (t, start) in PREFILLS.items():  # the model's call: 1 full-attention + 8 sliding-window layers

        def model_ms(r, t=t, start=start):
            return r["ms"][case_name("full", t, start)] + 8 * r["ms"][case_name("swa", t, start)]

        overall = min(done, key=model_ms)
        result[f"overall_{label}"] = {n: overall[n] for n in GRID} | {"ms": model_ms(overall),
                                                                      "default_ms": model_ms(done[0])}
        print(f"best for the {label} prefill (1 full + 8 SWA calls): {result[f'overall_{label}']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
