"""Selective-scan prefill (issue 14, item 2): the three-pass Triton scan against the single-pass and
look-back algorithms (`sambay.ops.triton.selective_scan`), at the release's sizes.

    PYTHONPATH=src timeout 170 python3 benchmarks/scan_prefill.py --out results/scan-prefill.json

Needs CUDA (torch + triton; nothing else from the package's dependencies). Inputs are laid out as
`sambay.model.mamba.Mamba` passes them: d_inner 5120 and d_state 16 (phi4-mini-flash), bf16 u and Δ
(contiguous), z the strided second half of in_proj's output, B and C strided slices of x_proj's output,
D and the Δ bias in bf16, A = -exp(A_log) in fp32, an fp32 initial state (the engine continues a
cache), no padding. Sizes (batch, tokens): one long prefill (1, 2K / 8K / 32K), the engine's 2K-token
prefill chunks at batch 16 and 64, and batch 2 / 4 / 8 at 2K to place SINGLE_PASS_MIN_PROGRAMS.

Per size and algorithm: the median of up to ``--reps`` runs after two warm-up runs (CUDA events, L2
flushed before each run), µs; bytes moved if every input is read once and every output written once,
over the time, as a fraction of the H200's 4.3 TB/s; the speed-up over three_pass; the max |error| of
y and of the final state against three_pass's (bf16 y: a few units in the last place are expected,
NaN means a look-back wait gave up); and which algorithm AUTO picks. One JSON line per result as it
comes, the whole list rewritten to ``--out`` after each result, so a run cut short keeps what it has.

``--device cpu --sizes 1x40,3x24 --d-inner 40 --chunk 8`` runs the same code on a CPU under Triton's
interpreter (set TRITON_INTERPRET=1), as a check of the script itself.

Defences: algorithms run in the order three_pass, single_pass, lookback_rerun, so the
riskiest come last; before the look-back rows, a smoke test at a small size (batch 2, 4 chunks)
compares them with three_pass and they are skipped if it fails; a watchdog ends the process after
``--time-limit`` seconds.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import statistics
import time

import torch
import triton

from sambay.ops.triton import selective_scan as scan

PEAK_BYTES_PER_S = 4.3e12  # H200 HBM3e
D_INNER, D_STATE, DT_RANK = 5120, 16, 160  # phi4-mini-flash: expand 2 × d_model 2560, dt_rank ⌈2560 / 16⌉
SIZES = [(1, 2048), (1, 8192), (1, 32768), (16, 2048), (64, 2048), (2, 2048), (4, 2048), (8, 2048)]
ORDER = [scan.ScanAlgorithm.THREE_PASS, scan.ScanAlgorithm.SINGLE_PASS, scan.ScanAlgorithm.LOOKBACK_RERUN]
LOOKBACKS = {scan.ScanAlgorithm.LOOKBACK_RERUN}


def make_inputs(b: int, t: int, d_inner: int, device: str, seed: int = 0) -> tuple:
    """The scan's arguments as the Mamba mixer passes them (bf16, strided z / B / C)."""
    g = torch.Generator(device=device).manual_seed(seed)
    bf16 = torch.bfloat16 if device == "cuda" else torch.float16  # the interpreter has no bf16

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device).mul_(scale).to(bf16)

    u = torch.nn.functional.silu(randn(b, t, d_inner))  # (b, t, d)
    z = randn(b, t, 2 * d_inner)[..., d_inner:]  # (b, t, d), row stride 2 d: in_proj's second half
    proj = randn(b, t, DT_RANK + 2 * D_STATE)  # (b, t, dt_rank + 2 n): x_proj's output
    B, C = proj[..., DT_RANK:DT_RANK + D_STATE], proj[..., DT_RANK + D_STATE:]  # (b, t, n) each, strided
    delta = randn(b, t, d_inner, scale=0.3)  # (b, t, d): dt_proj without its bias
    dt = torch.exp(torch.rand(d_inner, generator=g, device=device) * math.log(100) + math.log(1e-3))
    bias = (dt + torch.log(-torch.expm1(-dt))).to(bf16)  # softplus⁻¹ of Δ in [0.001, 0.1] (Mamba's init)
    A = -torch.arange(1, D_STATE + 1, device=device, dtype=torch.float32).repeat(d_inner, 1)  # S4D-real
    D = torch.ones(d_inner, device=device, dtype=bf16)
    h0 = torch.randn(b, d_inner, D_STATE, generator=g, device=device) * 0.1  # (b, d, n) fp32
    return u, delta, A, B, C, D, z, bias, h0


def moved_bytes(b: int, t: int, d: int) -> int:
    """Every input read once, every output written once: u, Δ, z, y (bf16); B, C; states; A, D, bias."""
    return 4 * b * t * d * 2 + 2 * b * t * D_STATE * 2 + 2 * b * d * D_STATE * 4 + d * D_STATE * 4 + 2 * d * 2


def time_us(fn, reps: int, budget_s: float, device: str) -> list[float]:
    """Run times in µs of ``fn`` after two warm-up runs (the first compiles), L2 flushed before each;
    CUDA events on a GPU, the wall clock on a CPU."""
    flush = torch.empty(256 * 2**20 if device == "cuda" else 1, dtype=torch.uint8, device=device)
    for _ in range(2):
        fn()
    _sync(device)
    times, start = [], time.perf_counter()
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        flush.zero_()
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) * 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e6)
    return times


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def lookback_smoke_test(args) -> str | None:
    """Look-back at 4 chunks × batch 2 against three_pass; None if right, else what went wrong."""
    inputs = make_inputs(2, 4 * scan.CHUNK, args.d_inner, args.device, seed=1)
    y_ref, h_ref = scan.selective_scan(*inputs, algorithm=scan.ScanAlgorithm.THREE_PASS)
    for algorithm in sorted(LOOKBACKS, key=lambda a: a.value):
        try:  # a compile error or fault here is reported, and the look-back rows are skipped
            y, h = scan.selective_scan(*inputs, algorithm=algorithm)
            _sync(args.device)
        except Exception as e:
            return f"{algorithm.value}: {type(e).__name__}: {e}"[:2000]
        err = max(max_err(y, y_ref) / max(y_ref.float().abs().max().item(), 1e-6), max_err(h, h_ref))
        if not err < 0.05:  # catches NaN too
            return f"{algorithm.value}: relative error {err:.3g} against three_pass"
    return None


def measure(b: int, t: int, algorithm, inputs: tuple, ref: tuple | None, args) -> tuple[dict, tuple]:
    """One size and algorithm: timings, bandwidth, errors against ``ref`` (three_pass's y and state)."""
    y, h = scan.selective_scan(*inputs, algorithm=algorithm)
    _sync(args.device)
    times = time_us(lambda: scan.selective_scan(*inputs, algorithm=algorithm), args.reps, args.budget_s,
                    args.device)
    us, moved = statistics.median(times), moved_bytes(b, t, args.d_inner)
    row = {"batch": b, "t": t, "algorithm": algorithm.value, "us": round(us, 1),
           "us_all": [round(x, 1) for x in times], "bytes": moved, "tb_per_s": round(moved / us / 1e6, 3),
           "fraction_of_peak": round(moved / (us * 1e-6) / PEAK_BYTES_PER_S, 4),
           "is_auto": scan.choose_algorithm(scan.ScanAlgorithm.AUTO, b, args.d_inner, t) is algorithm,
           "y_max_err": 0.0 if ref is None else max_err(y, ref[0]),
           "state_max_err": 0.0 if ref is None else max_err(h, ref[1]),
           "y_max_abs": y.float().abs().max().item()}
    return row, (y, h)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results here as a JSON list")
    p.add_argument("--reps", type=int, default=10, help="timed runs per size and algorithm (at most)")
    p.add_argument("--budget-s", type=float, default=0.5, help="stop timing a case after this long (>= 3 runs)")
    p.add_argument("--time-limit", type=float, default=150.0, help="watchdog: exit after this many seconds")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", default=",".join(f"{b}x{t}" for b, t in SIZES), help="BATCHxTOKENS,...")
    p.add_argument("--d-inner", type=int, default=D_INNER)
    p.add_argument("--chunk", type=int, default=scan.CHUNK, help="tokens per chunk of the chunked algorithms")
    p.add_argument("--block-d", type=int, default=scan.BLOCK_D, help="channels per program (a power of two)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (--device cpu runs under Triton's interpreter)")
    faulthandler.dump_traceback_later(args.time_limit, exit=True)
    scan.CHUNK, scan.BLOCK_D = args.chunk, args.block_d
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    head = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "d_inner": args.d_inner, "chunk": scan.CHUNK,
            "block_d": scan.BLOCK_D, "single_pass_min_programs": scan.SINGLE_PASS_MIN_PROGRAMS}
    print(json.dumps(head), flush=True)
    inputs = {size: make_inputs(*size, args.d_inner, args.device) for size in sizes}
    refs, rows = {}, []
    for algorithm in ORDER:
        if algorithm in LOOKBACKS and "lookback_smoke_test" not in head:  # after the safe algorithms' rows
            head["lookback_smoke_test"] = lookback_smoke_test(args) or "ok"
            print(json.dumps({"lookback_smoke_test": head["lookback_smoke_test"]}), flush=True)
        if algorithm in LOOKBACKS and head["lookback_smoke_test"] != "ok":
            continue
        for b, t in sizes:
            row, out = measure(b, t, algorithm, inputs[b, t], refs.get((b, t)), args)
            if algorithm is scan.ScanAlgorithm.THREE_PASS:
                refs[b, t] = (*out, row["us"])
            row["speedup_vs_three_pass"] = round(refs[b, t][2] / row["us"], 3)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "us_all"}), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({**head, "rows": rows}, f, indent=1)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print(f"{'batch':>5} {'tokens':>6} {'algorithm':>15} {'µs':>10} {'of 4.3 TB/s':>11} {'speed-up':>8} "
          f"{'y err':>9} {'state err':>9} auto")
    for r in sorted(rows, key=lambda r: (r["batch"], r["t"])):
        print(f"{r['batch']:>5} {r['t']:>6} {r['algorithm']:>15} {r['us']:>10.1f} {r['fraction_of_peak']:>11.1%} "
              f"{r['speedup_vs_three_pass']:>8.2f} {r['y_max_err']:>9.2e} {r['state_max_err']:>9.2e} "
              f"{'*' if r['is_auto'] else ''}")


if __name__ == "__main__":
    raise SystemExit(main())
