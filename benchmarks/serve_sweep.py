"""The paper's serving figure, end to end: throughput and latency against concurrency through `sambay serve`.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/serve_sweep.py --out results/ --arch sambay --concurrency 1 4 16 64 --max-tokens 8192
    python3 benchmarks/serve_sweep.py --out results/ --arch transformer --concurrency 64 --max-tokens 8192
    python3 benchmarks/serve_sweep.py --out results/ --arch sambay --concurrency 16 64 --max-tokens 2048 \
        --json-schema benchmarks/schemas/steps.json                   # the same load, every answer a grammar

For each architecture (`--arch`: the release's SambaY, or our Transformer++ of the same width and depth:
32 full-attention layers with RoPE, `sambay.config.transformer_plan`):
1. a random full-size checkpoint in the released format (bf16; the shapes and the work are the real ones);
2. `python -m sambay.cli serve` on it (CUDA, bf16, ``--slots``, ``--cache-memory-gb`` of K/V + state);
3. per concurrency C: C streaming requests at once (one wave), each a ``--prompt-tokens`` prompt of token ids
   and ``--max-tokens`` greedy output tokens that never stop early (`sambay.serve.loadgen`, the code of
   `sambay bench-serve --prompt-tokens`), with the bandwidth limit at the run's mean batch and context;
4. after the server stops, in the same run: the offline fixed-context decode step (`sambay.bench.runs`) at
   batch C and the same mean context, the baseline a server cannot beat.
With ``--json-schema FILE`` every request carries that schema as its ``response_format`` (a completion:
the grammar applies from the first token), so each decode step also computes the grammar's token masks;
`benchmarks/schemas/steps.json` asks for at least 4,096 short strings, more than 8,192 tokens can close,
so no request stops early and the two runs decode the same tokens per request.
Writes sweep-<arch>.json (sweep-<arch>-json.json with a schema) and prints one table row per level.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

import sambay
from sambay.bench.hardware import copy_bandwidth
from sambay.bench.runs import decode_step_seconds
from sambay.config import PRESETS, transformer_plan
from sambay.serve.loadgen import LoadConfig, ModelFootprint, run_load

RELEASED = Path(__file__).resolve().parent.parent / "tests" / "data" / "phi-4-mini-flash-reasoning"


def architecture(name: str) -> sambay.SambaYConfig:
    """The release (``sambay``) or a dense Transformer++ of its width, depth and vocabulary."""
    release = PRESETS["phi4-mini-flash"]
    if name == "sambay":
        return release
    return dataclasses.replace(release, plan=transformer_plan(release.n_layers), differential=False,
                               rope_theta=10000.0)


def make_model(directory: Path, config: sambay.SambaYConfig) -> None:
    """A random checkpoint in the released format, with the release's tokenizer files."""
    if (directory / "config.json").exists():
        return
    with torch.device("cuda"):
        model = sambay.SambaY(config).init_weights(torch.Generator("cuda").manual_seed(0))
    sambay.save_model(model.to_dtype(torch.bfloat16), directory)
    for name in ("tokenizer_config.json", "generation_config.json"):
        (directory / name).write_bytes((RELEASED / name).read_bytes())
    del model
    torch.cuda.empty_cache()


def start_server(directory: Path, args, log) -> tuple[subprocess.Popen, float]:
    """The server, and the seconds until /health answered (load, graph capture, warm-up)."""
    command = [sys.executable, "-m", "sambay.cli", "serve", "--model", str(directory), "--device", "cuda",
               "--dtype", "bfloat16", "--slots", str(args.slots), "--max-length", str(args.max_length),
               "--cache-memory-gb", str(args.cache_memory_gb), "--port", str(args.port), "--max-waiting", "1024",
               "--prefix-cache-gb", str(args.prefix_cache_gb)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - started < 600:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up; see the log")
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.TransportError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become ready in 600 s")


def offline_step(model, batch: int, context: int) -> dict:
    """The fixed-context CUDA-graph decode step of ``batch`` rows: its time and tokens/s (or why not)."""
    try:
        seconds = decode_step_seconds(model, batch, context, steps=30, graphs=True)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}
    return {"step_ms": round(seconds * 1e3, 3), "output_tokens_per_s": round(batch / seconds, 1)}


def sweep(args, directory: Path, log) -> tuple[list[dict], float]:
    server, ready_s = start_server(directory, args, log)
    print(f"server ready in {ready_s:.1f} s (load, graphs, warm-up)", flush=True)
    footprint = ModelFootprint.read(directory)
    reports = []
    try:
        for c in args.concurrency:
            config = LoadConfig(url=f"http://127.0.0.1:{args.port}", concurrency=c, requests=c,
                                prompt_lengths=(args.prompt_tokens,), prompt_unit="tokens", max_tokens=args.max_tokens,
                                workers=max(1, min(8, c // 16)), timeout_s=3600, json_schema=args.schema)
            report = asyncio.run(run_load(config, footprint, args.bandwidth))
            reports.append(report)
            print(json.dumps(report), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=300)
    return reports, ready_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", choices=("sambay", "transformer"), default="sambay")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--cache-memory-gb", type=float, default=100.0)
    p.add_argument("--prefix-cache-gb", type=float, default=2.0, help="the server's prefix-cache snapshot memory "
                   "(default: 2, the server's own default; 0 turns prefix caching off)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--no-offline", action="store_true", help="skip the offline fixed-context baseline")
    p.add_argument("--json-schema", type=Path, help="send this JSON Schema with every request (response_format)")
    args = p.parse_args()
    args.schema = json.loads(args.json_schema.read_text()) if args.json_schema else None
    name = args.arch + ("-json" if args.schema else "")
    args.max_length = args.prompt_tokens + args.max_tokens + 64
    args.out.mkdir(parents=True, exist_ok=True)
    args.bandwidth = copy_bandwidth()
    config = architecture(args.arch)
    directory = Path(f"/tmp/sweep-{args.arch}")
    started = time.perf_counter()
    make_model(directory, config)
    print(f"{args.arch}: checkpoint written in {time.perf_counter() - started:.0f} s", flush=True)
    with open(args.out / f"serve-{name}.log", "w") as log:
        reports, ready_s = sweep(args, directory, log)
    if not args.no_offline:
        model = sambay.load_model(directory, device="cuda", dtype=torch.bfloat16, progress=False)
        for report in reports:
            context = report.get("bandwidth_limit", {}).get("mean_context", args.prompt_tokens + args.max_tokens // 2)
            report["offline_step"] = offline_step(model, report["concurrency"], context)
    result = {"arch": args.arch, "gpu": torch.cuda.get_device_name(), "bandwidth_bytes_per_s": args.bandwidth,
              "slots": args.slots, "cache_memory_gb": args.cache_memory_gb,
              "prefix_cache_gb": args.prefix_cache_gb, "prompt_tokens": args.prompt_tokens,
              "max_tokens": args.max_tokens, "server_ready_s": round(ready_s, 1), "runs": reports,
              "json_schema": args.schema, "torch": torch.__version__}
    (args.out / f"sweep-{name}.json").write_text(json.dumps(result, indent=1))
    print("| arch | C | output tok/s | of limit | offline step tok/s | served / offline | TTFT p50/p99 ms | "
          "ITL p50/p99 ms | failed |")
    for r in reports:
        limit, offline = r.get("bandwidth_limit", {}), r.get("offline_step", {})
        ratio = (f"{r['output_tokens_per_s'] / offline['output_tokens_per_s']:.2f}"
                 if offline.get("output_tokens_per_s") else "-")
        print(f"| {name} | {r['concurrency']} | {r['output_tokens_per_s']} | "
              f"{limit.get('fraction_of_limit', 0):.0%} | {offline.get('output_tokens_per_s', offline.get('error'))} | "
              f"{ratio} | {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} | {r['itl_ms']['p50']}/{r['itl_ms']['p99']} | "
              f"{r['failed']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
