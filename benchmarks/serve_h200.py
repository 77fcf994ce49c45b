"""Serving benchmark on one GPU: `sambay serve` on the full-size random model, loaded by `bench-serve`.

    eval "$(bash benchmarks/device_setup.sh)"           # on the lent GPU machine: the serve extra
    python3 benchmarks/serve_h200.py --out results/     # writes serve.json, serve.md, serve.log

1. Writes a random Phi-4-mini-flash-sized checkpoint in the released format (bf16, 3.85B parameters)
   with the release's tokenizer files (the weights are random, the shapes and the work are the real ones).
2. Starts `python -m sambay.cli serve` on it (CUDA, bf16, ``--slots`` rows, CUDA-graph decode step) and
   waits for /health.
3. For each concurrency C: ``max(16, 4 C)`` streaming /v1/completions requests, prompts of 16/64/128
   words, greedy, ``--max-tokens`` each (`sambay.serve.loadgen`, the code behind `bench-serve`).
4. Baselines, measured in the same run after the server stops: the offline `Engine` generating the
   same prompts as one batch of C (no HTTP, no scheduler); the same `Scheduler` driven in-process with
   the same requests (no HTTP: what the HTTP layer costs); and the bandwidth limit of a decode step of
   C rows (`sambay.bench.limits.decode_bytes` at the mean context / the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

import sambay
from sambay.bench.hardware import copy_bandwidth
from sambay.bench.limits import decode_bytes
from sambay.config import PRESETS
from sambay.generate import Engine, SamplingParams
from sambay.serve.loadgen import LoadConfig, run_load

RELEASED = Path(__file__).resolve().parent.parent / "tests" / "data" / "phi-4-mini-flash-reasoning"
PROMPT_WORDS = (16, 64, 128)


def make_model(directory: Path) -> None:
    """A random full-size checkpoint in the released format, with the release's tokenizer files."""
    if (directory / "model.safetensors.index.json").exists():
        return
    config = PRESETS["phi4-mini-flash"]
    with torch.device("cuda"):
        model = sambay.SambaY(config).init_weights(torch.Generator("cuda").manual_seed(0))
    sambay.save_model(model.to_dtype(torch.bfloat16), directory)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(RELEASED / name, directory / name)
    del model
    torch.cuda.empty_cache()


def start_server(directory: Path, args, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "sambay.cli", "serve", "--model", str(directory), "--device", "cuda",
               "--dtype", "bfloat16", "--slots", str(args.slots), "--max-length", str(args.max_length),
               "--port", str(args.port), "--max-waiting", "1024"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up; see serve.log")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become ready in 600 s")


def offline_baseline(engine: Engine, concurrency: int, max_tokens: int) -> dict:
    """The same prompts as one batch through `Engine` (no server). Each `generate` allocates a cache and
    captures its decode graph, so the steady decode rate is taken from two runs: (tokens of a long run -
    tokens of an 8-token run) / (their time difference)."""
    prompts = [" ".join(["word"] * PROMPT_WORDS[i % len(PROMPT_WORDS)]) for i in range(concurrency)]
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, stop_token_ids=())

    def timed(p: SamplingParams) -> tuple[int, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, p)
        torch.cuda.synchronize()
        return sum(len(c.token_ids) for row in out for c in row), time.perf_counter() - start

    timed(params.replace(max_new_tokens=8))  # warm-up: kernels for these shapes
    short_tokens, short_s = timed(params.replace(max_new_tokens=8))
    tokens, seconds = timed(params)
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 1),
            "decode_tokens_per_s": round((tokens - short_tokens) / (seconds - short_s), 1)}


def scheduler_baseline(engine: Engine, concurrency: int, max_tokens: int, slots: int, max_length: int) -> dict:
    """The server's scheduler driven in-process: C requests in flight, ``max(16, 4 C)`` in all, no HTTP."""
    from sambay.generate.core import EngineCore
    from sambay.generate.requests import SchedulerConfig

    scheduler = EngineCore(engine, SchedulerConfig(slots=slots, max_length=max_length))
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, stop_token_ids=())
    total, state = max(16, 4 * concurrency), {"submitted": 0, "finished": 0, "tokens": 0}

    def submit() -> None:
        words = PROMPT_WORDS[state["submitted"] % len(PROMPT_WORDS)]
        state["submitted"] += 1
        scheduler.submit(engine.tokenizer.encode(" ".join(["word"] * words)), params, sink)

    def sink(output) -> None:
        state["tokens"] += len(output.deltas)
        if output.finished:
            state["finished"] += 1
            if state["submitted"] < total:
                submit()

    for _ in range(concurrency):
        submit()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while state["finished"] < total:
        scheduler.step()
    elapsed = time.perf_counter() - start
    return {"output_tokens": state["tokens"], "seconds": round(elapsed, 3),
            "output_tokens_per_s": round(state["tokens"] / elapsed, 1)}


def server_sums(port: int) -> dict[str, float]:
    """Sums and counts of the server's own queue-time and TTFT histograms (/metrics)."""
    wanted = ("sambay_queue_time_seconds_sum", "sambay_queue_time_seconds_count",
              "sambay_time_to_first_token_seconds_sum", "sambay_time_to_first_token_seconds_count")
    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def _server_means(before: dict, after: dict) -> dict:
    def mean(metric: str) -> float:
        n = after[f"{metric}_count"] - before[f"{metric}_count"]
        return round(1e3 * (after[f"{metric}_sum"] - before[f"{metric}_sum"]) / max(n, 1), 1)

    return {"queue_ms_mean": mean("sambay_queue_time_seconds"),
            "ttft_ms_mean": mean("sambay_time_to_first_token_seconds")}


def warm_up(port: int) -> None:
    """One request of each prompt length first: Triton compiles the prefill kernels for new shapes."""
    model = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"]
    for words in PROMPT_WORDS:
        body = {"model": model, "prompt": " ".join(["word"] * words), "max_tokens": 4}
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/phi4-mini-flash-random"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--port", type=int, default=8011)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    make_model(args.model_dir)
    print(f"model written in {time.perf_counter() - started:.0f} s", flush=True)
    runs = []
    with open(args.out / "serve.log", "w") as log:
        server = start_server(args.model_dir, args, log)
        print(f"server ready after {time.perf_counter() - started:.0f} s", flush=True)
        try:
            warm_up(args.port)
            for c in args.concurrency:
                config = LoadConfig(url=f"http://127.0.0.1:{args.port}", concurrency=c, requests=max(16, 4 * c),
                                    prompt_lengths=PROMPT_WORDS, max_tokens=args.max_tokens, workers=max(1, c // 8))
                before = server_sums(args.port)
                report = asyncio.run(run_load(config))
                report["server_side"] = _server_means(before, server_sums(args.port))
                print(json.dumps(report), flush=True)
                runs.append(report)
            metrics = httpx.get(f"http://127.0.0.1:{args.port}/metrics", timeout=10).text
            (args.out / "metrics.txt").write_text(metrics)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    bandwidth = copy_bandwidth()
    config = PRESETS["phi4-mini-flash"]
    with torch.device("meta"):
        weight_bytes = 2 * sum(t.numel() for t in sambay.SambaY(config, backend="reference").parameters())
    engine = Engine.load(args.model_dir, device="cuda", dtype=torch.bfloat16, progress=False)
    context = sum(PROMPT_WORDS) // len(PROMPT_WORDS) + args.max_tokens // 2
    for report in runs:
        c = report["concurrency"]
        report["offline_engine"] = offline_baseline(engine, c, args.max_tokens)
        report["scheduler_in_process"] = scheduler_baseline(engine, c, args.max_tokens, args.slots, args.max_length)
        step_s = decode_bytes(config, weight_bytes, c, context) / bandwidth
        report["limit_output_tokens_per_s"] = round(c / step_s, 1)
        print(json.dumps({k: report[k] for k in ("offline_engine", "scheduler_in_process")}), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "bandwidth_GBps": round(bandwidth / 1e9, 1),
              "slots": args.slots, "max_length": args.max_length, "max_tokens": args.max_tokens,
              "mean_context": context, "runs": runs, "torch": torch.__version__, "pid": os.getpid()}
    (args.out / "serve.json").write_text(json.dumps(result, indent=1))
    lines = ["| concurrency | requests/s | output tok/s | scheduler alone tok/s | offline Engine tok/s (steady) | "
             "vs offline | vs limit | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |", "|---" * 9 + "|"]
    for r in runs:
        t, i = r["ttft_ms"], r["itl_ms"]
        lines.append(f"| {r['concurrency']} | {r['requests_per_s']} | {r['output_tokens_per_s']} | "
                     f"{r['scheduler_in_process']['output_tokens_per_s']} | "
                     f"{r['offline_engine']['output_tokens_per_s']} ({r['offline_engine']['decode_tokens_per_s']}) | "
                     f"{r['output_tokens_per_s'] / r['offline_engine']['output_tokens_per_s']:.2f}x | "
                     f"{r['output_tokens_per_s'] / r['limit_output_tokens_per_s']:.0%} | "
                     f"{t['p50']}/{t['p90']}/{t['p99']} | {i['p50']}/{i['p90']}/{i['p99']} |")
    (args.out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
