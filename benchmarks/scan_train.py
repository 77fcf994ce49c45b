"""The training scan (issue 18): forward + backward of the trainable Triton scan against autograd through the
reference scan, at the release's d_inner 5120 and d_state 16, bf16 inputs.

    PYTHONPATH=src python3 benchmarks/scan_train.py --out results/scan-train.json

Per size (batch × tokens): milliseconds of one forward + backward (median of ``--reps`` after a warm-up) of
the sequential and the chunked algorithm (`sambay.ops.triton.selective_scan_train`) and of what "auto" picks,
the peak GPU memory above the inputs, and the largest gradient difference between the two relative to the
reference gradient's largest magnitude. The reference is `sambay train --scan-kernel reference`; the Triton
scan is the default on GPUs. A watchdog (``--time-limit``) ends the run; results are printed and
written as they come. ``--sweep`` times the Triton scan alone over its launch settings (BLOCK channels per
program, WARPS per program): at one row the default 16 x 4 gives the 900M preset's d_inner of 3072 only 192
programs, each a 16K-step sequential walk, so the kernel is latency-bound and narrower blocks may pay.
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import json
import statistics

import torch

from sambay.ops import selective_scan_ref
from sambay.ops.triton import selective_scan_train as tri
from sambay.ops.triton.selective_scan_train import selective_scan_trainable

D_INNER, D_STATE = 5120, 16
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make(b: int, t: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).bfloat16()

    return {"u": r(b, t, D_INNER), "delta": r(b, t, D_INNER, scale=0.5),
            "A": -(torch.rand(D_INNER, D_STATE, generator=g, device="cuda") * 8 + 0.1),
            "B": r(b, t, D_STATE), "C": r(b, t, D_STATE), "D": r(D_INNER), "z": r(b, t, D_INNER),
            "delta_bias": r(D_INNER) - 4}


def step(fn, inputs: dict, gy: torch.Tensor) -> dict:
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    y, _ = fn(*(leaves[k] for k in NAMES))
    y.backward(gy)
    return {k: v.grad for k, v in leaves.items()}


def timed(fn, inputs, gy, reps: int) -> tuple[float, float, dict]:
    grads = step(fn, inputs, gy)  # warm-up (compiles)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        grads = step(fn, inputs, gy)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30, grads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1x2048,1x8192,4x2048", help="BATCHxTOKENS,...")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=120.0)
    p.add_argument("--sweep", action="store_true", help="time the Triton scan at every BLOCK x WARPS of SWEEP "
                   "instead of against the reference (each checked against the default setting's gradients)")
    p.add_argument("--out")
    args = p.parse_args()
    faulthandler.dump_traceback_later(args.time_limit, exit=True)
    if args.sweep:
        return sweep(args)
    rows = []
    for size in args.sizes.split(","):
        b, t = (int(v) for v in size.split("x"))
        inputs = make(b, t)
        gy = torch.randn(b, t, D_INNER, device="cuda").bfloat16()
        row = {"batch": b, "tokens": t, "auto": "chunked" if tri.chunked(b, D_INNER, gy.device) else "sequential"}
        for algorithm in ("sequential", "chunked"):  # the two walks, the same inputs
            tri.ALGORITHM = algorithm
            ms_a, gib_a, grads_a = timed(selective_scan_trainable, inputs, gy, args.reps)
            row.update({f"{algorithm}_ms": round(ms_a, 3), f"{algorithm}_peak_gib": round(gib_a, 2)})
            if algorithm == "sequential":
                first = grads_a
            else:
                row["chunked_vs_sequential_grad_rel_err"] = max(
                    float((grads_a[k].float() - first[k].float()).abs().max()
                          / first[k].float().abs().max().clamp_min(1e-30)) for k in NAMES)
            del grads_a
        tri.ALGORITHM = "auto"
        ms_t, gib_t, grads_t = timed(selective_scan_trainable, inputs, gy, args.reps)
        row.update(triton_ms=round(ms_t, 3), triton_peak_gib=round(gib_t, 2))
        try:
            ms_r, gib_r, grads_r = timed(selective_scan_ref, inputs, gy, args.reps)
            row.update(reference_ms=round(ms_r, 3), reference_peak_gib=round(gib_r, 2),
                       speedup=round(ms_r / ms_t, 2),
                       grad_rel_err={k: float((grads_t[k].float() - grads_r[k].float()).abs().max()
                                              / grads_r[k].float().abs().max().clamp_min(1e-30)) for k in NAMES})
        except torch.OutOfMemoryError:
            row["reference"] = "out of memory"
        del grads_t
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


SWEEP = {"BLOCK": (4, 8, 16, 32), "WARPS": (1, 2, 4, 8)}


def sweep(args) -> int:
    """Each size and algorithm: the default setting, then every (BLOCK, WARPS); milliseconds of forward +
    backward and the largest gradient difference from the first setting's, relative to its largest magnitude.
    Written as it goes."""
    default = (tri.BLOCK, tri.WARPS)
    rows = []
    for size in args.sizes.split(","):
        b, t = (int(v) for v in size.split("x"))
        inputs = make(b, t)
        gy = torch.randn(b, t, D_INNER, device="cuda").bfloat16()
        want = None
        settings = [default, *((bl, w) for bl in SWEEP["BLOCK"] for w in SWEEP["WARPS"])]
        for algorithm, (block, warps) in itertools.product(("sequential", "chunked"), settings):
            tri.ALGORITHM, tri.BLOCK, tri.WARPS = algorithm, block, warps
            row = {"batch": b, "tokens": t, "algorithm": algorithm, "BLOCK": block, "WARPS": warps}
            try:
                ms, gib, grads = timed(selective_scan_trainable, inputs, gy, args.reps)
            except Exception as e:  # out of registers or shared memory: the setting is skipped
                row["error"] = str(e)[:200]
            else:
                if want is None:
                    want = grads
                row.update(ms=round(ms, 3), peak_gib=round(gib, 2), grad_rel_err_vs_default=max(
                    float((grads[k].float() - want[k].float()).abs().max()
                          / want[k].float().abs().max().clamp_min(1e-30)) for k in NAMES))
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    tri.BLOCK, tri.WARPS, tri.ALGORITHM = *default, "sequential"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
