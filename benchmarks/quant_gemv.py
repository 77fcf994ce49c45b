"""The dequantising matmul at decode sizes (issue 14): int8 / int4 against cuBLAS bf16, per projection.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/quant_gemv.py --out results/quant-gemv.json

For each projection shape of the release (`sambay.quant.layer.projections` of the 3.85B configuration,
with how many of each a decode step runs) and rows M in ``--rows``: the time of one call, measured as a
CUDA graph of ``--calls`` back-to-back calls replayed (as the decode graph runs them: no launch latency),
for cuBLAS on the bf16 weight and for `sambay.ops.triton.quantized_matmul` on the int8 and int4 weight.
Each kernel configuration of a small grid (the module's constants of the path M takes: the CUDA-core GEMV
path's GEMV_* for one row, else the tl.dot decode kernel's BLOCK_N_DECODE, BLOCK_K_DECODE,
DECODE_STAGES, MIN_PROGRAMS_PER_SM) is timed, and the one with the least summed time over a step's
projections is reported per (format, M), with its bandwidth as a fraction of 4.3 TB/s. A time cap
(``--max-seconds``, shared equally by the (format, M) pairs) stops a sweep early and keeps what was
measured. Every configuration's output is
checked against the reference before it is timed.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import random
import time

import torch

from sambay.bench.hardware import graphed_seconds
from sambay.config import PHI4_MINI_FLASH
from sambay.model.sambay import SambaY
from sambay.ops.quantized_matmul import quantize_rtn, quantized_matmul_ref
from sambay.ops.triton import quantized_matmul as tri
from sambay.quant.layer import projections

LIMIT = 4.3e12
FORMAT = {8: "int8", 4: "int4", 16: "bf16-gemv"}
# The tl.dot decode kernel (5-16 rows). BLOCK_K_DECODE 256 spilled (10x slower on the H200, 2026-12-01),
# and 2 stages never won: both left out.
GRID = {"BLOCK_N_DECODE": (32, 64, 128), "BLOCK_K_DECODE": (128,), "DECODE_STAGES": (3,),
        "MIN_PROGRAMS_PER_SM": (2, 4, 8)}
# The CUDA-core GEMV path (one row). The first version (1-4 rows through a 3-D broadcast) ran 5 ms a step for
# int8 and bf16 on the H200, 2.5x cuBLAS: rewritten as one row with a 2-D accumulator.
GEMV_GRID = {"GEMV_BLOCK_N": (16, 32, 64), "GEMV_BLOCK_K": (64, 128), "GEMV_WARPS": (4, 8),
             "GEMV_MIN_PROGRAMS_PER_SM": (4, 16)}  # the first is GEMV_BLOCK_K, the others GEMV_TILES[bits]


def shapes() -> dict[tuple[int, int], int]:
    """(n_out, n_in) → projections of that shape in one decode step."""
    with torch.device("meta"):
        model = SambaY(PHI4_MINI_FLASH, backend="reference")
    return dict(collections.Counter((lin.out_features, lin.in_features) for _, lin in projections(model)))


def _call(x, weight, bits: int, group_size: int):
    if bits == 16:
        return lambda: tri.gemv(x, weight["bf16"])
    qw, sc = weight[bits]
    return lambda: tri.quantized_matmul(x, qw, sc, bits, group_size)


def measure(step_shapes, weights, xs, bits: int, args) -> tuple[float, float]:
    """(summed seconds of a step's projections, largest relative error against the reference).

    Warm (the default): each shape's first weight, ``--calls`` calls in a graph, times its count. Cold
    (``--cold``): every projection of a step with its own weight (6.6 GB in bf16, far more than the 50 MB
    L2), all in one graph, as the decode step streams them."""
    total, err, step = 0.0, 0.0, []
    for (n, k), count in step_shapes.items():
        x = xs[n, k]
        if bits == 16:
            w = weights[n, k][0]["bf16"]
            got, want = tri.gemv(x, w).float(), x.float() @ w.float().t()
        else:
            qw, sc = weights[n, k][0][bits]
            got = tri.quantized_matmul(x, qw, sc, bits, args.group_size).float()
            want = quantized_matmul_ref(x.float(), qw, sc, bits, args.group_size)
        err = max(err, float((got - want).abs().max() / want.abs().max()))
        if args.cold:
            step += [_call(x, weights[n, k][i], bits, args.group_size) for i in range(count)]
        else:
            total += count * graphed_seconds(_call(x, weights[n, k][0], bits, args.group_size), args.calls)
    if args.cold:
        total = graphed_seconds(lambda: [c() for c in step], 1)
    return total, err


def baseline(step_shapes, weights, xs, args) -> float:
    """cuBLAS bf16 seconds of a step's projections, warm or cold as in `measure`."""
    if args.cold:
        step = [(xs[n, k], weights[n, k][i]["bf16"]) for (n, k), count in step_shapes.items() for i in range(count)]
        return graphed_seconds(lambda: [x @ w.t() for x, w in step], 1)
    return sum(count * graphed_seconds(lambda w=weights[n, k][0]["bf16"], x=xs[n, k]: x @ w.t(), args.calls)
               for (n, k), count in step_shapes.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--max-seconds", type=float, default=150.0)
    p.add_argument("--cold", action="store_true", help="time a whole step's projections, each its own weight, "
                   "in one graph (weights streamed from HBM, as in the model) instead of each shape warm in L2")
    p.add_argument("--formats", type=int, nargs="+", default=[8, 4, 16], choices=(8, 4, 16),
                   help="bits of the formats swept (16: our GEMV on the bf16 weight, one row only)")
    p.add_argument("--out")
    args = p.parse_args()
    dev = torch.device("cuda")
    step_shapes = shapes()
    weights, result = {}, {"shapes": {f"{n}x{k}": c for (n, k), c in step_shapes.items()}, "rows": [],
                           "cold": args.cold}
    g = torch.Generator(device=dev).manual_seed(0)
    for (n, k), count in step_shapes.items():
        weights[n, k] = []
        for _ in range(count if args.cold else 1):
            w = torch.randn(n, k, device=dev, generator=g, dtype=torch.float32) / k**0.5
            weights[n, k].append({"bf16": w.bfloat16(),
                                  **{bits: quantize_rtn(w, bits, args.group_size) for bits in (8, 4)}})
    for m in args.rows:
        xs = {(n, k): torch.randn(m, k, device=dev, generator=g).bfloat16() for n, k in step_shapes}
        total = baseline(step_shapes, weights, xs, args)
        bf16_bytes = sum(2 * n * k * c for (n, k), c in step_shapes.items())
        result["rows"].append({"format": "bf16-cublas", "m": m, "step_projection_ms": total * 1e3,
                               "fraction_of_limit": bf16_bytes / LIMIT / total})
        print(f"M={m} cuBLAS bf16: {total * 1e3:.3f} ms of projections a step, "
              f"{bf16_bytes / LIMIT / total:.1%} of 4.3 TB/s", flush=True)
        for bits in [b for b in args.formats if b != 16 or m <= tri.GEMV_ROWS]:  # 16: our GEMV, bf16 weight
            q_bytes = bf16_bytes if bits == 16 else sum(
                (n * k * bits // 8 + n * (k // args.group_size) * 4) * c for (n, k), c in step_shapes.items())
            best, started = None, time.monotonic()
            grid = GEMV_GRID if m <= tri.GEMV_ROWS else GRID
            settings = list(itertools.product(*grid.values()))
            random.Random(0).shuffle(settings)  # a cut-short sweep still samples the whole grid
            for values in settings:  # each (M, format) gets its share of the time cap
                if time.monotonic() - started > args.max_seconds / (len(args.formats) * len(args.rows)):
                    result["stopped"] = "time cap"
                    break
                setting = dict(zip(grid, values, strict=True))
                if grid is GEMV_GRID:  # every format takes the GEMV path, with these tiles
                    tri.GEMV_FORMATS, tri.GEMV_BLOCK_K = (4, 8), setting["GEMV_BLOCK_K"]
                    tri.GEMV_TILES = {**tri.GEMV_TILES, bits: (setting["GEMV_BLOCK_N"], setting["GEMV_WARPS"],
                                                               setting["GEMV_MIN_PROGRAMS_PER_SM"])}
                else:
                    for name, value in setting.items():
                        setattr(tri, name, value)
                tri._workspaces.clear()
                try:
                    total, err = measure(step_shapes, weights, xs, bits, args)
                except Exception as e:  # a tile too large for shared memory, say: the setting is skipped
                    result["rows"].append({"format": FORMAT[bits], "m": m, **setting, "error": str(e)[:200]})
                    print(f"M={m} int{bits} {setting}: {str(e)[:120]}", flush=True)
                    continue
                row = {"format": FORMAT[bits], "m": m, **setting, "step_projection_ms": total * 1e3,
                       "fraction_of_limit": q_bytes / LIMIT / total, "max_rel_err": err}
                result["rows"].append(row)
                if best is None or total < best["step_projection_ms"] / 1e3:
                    best = row
            if best:
                print(f"M={m} int{bits} best {best}", flush=True)
                result.setdefault("best", []).append(best)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
