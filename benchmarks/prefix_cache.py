"""Prefix caching in the engine core (issue 15): time to first token and throughput, cache on and off.

    eval "$(bash benchmarks/device_setup.sh)"
    python3 benchmarks/prefix_cache.py --out results/prefix-cache.json

On the full-size random model (bf16, built on the device, no checkpoint; ``--preset tiny --device cpu``
runs the same code on a CPU), three workloads, each on two cores over the same model, one with the
prefix cache (``--prefix-cache-gb``) and one without, in the same run:
- ``shared``: 64 requests of one 2K-token system prompt followed by a different 100-token question each,
  sent at once after one request with the same system prompt has finished (as on a live server);
- ``samples``: 64 requests of one 500-token problem, sent at once after one has finished;
- ``chat``: a 10-turn conversation, each turn the conversation so far (its replies included) plus a new
  100-token message.
Per workload and setting: TTFT p50 and mean, output tokens/s over the burst, prompt tokens served from
the cache. Greedy decoding of ``--max-tokens`` tokens that never stop early. In process (no HTTP): the
cost measured is the engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sambay
from sambay.config import PRESETS
from sambay.generate import Engine, SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.requests import SchedulerConfig


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab - 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def burst(core: EngineCore, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Submit ``prompts`` at once, run them to the end: TTFT per request, output tokens, seconds."""
    first, done, tokens = {}, set(), [0]

    def sink(i):
        def put(output):
            if output.deltas and i not in first:
                first[i] = time.perf_counter()
            tokens[0] += len(output.deltas)
            if output.finished:
                done.add(i)
        return put

    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.submit(prompt, params, sink(i))
    while len(done) < len(prompts):
        core.step(True)
    _sync(core.runner.device)
    seconds = time.perf_counter() - start
    return {"ttft": [first[i] - start for i in range(len(prompts))], "tokens": tokens[0], "seconds": seconds}


def workload(core: EngineCore, name: str, args, vocab: int) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=args.max_tokens, stop_token_ids=())
    hits = core.stats()["prefix_cache_hits"]
    if name == "chat":
        conversation, ttft, tokens, seconds = _tokens(args.system_tokens, 1, vocab), [], 0, 0.0
        for turn in range(10):
            conversation += _tokens(args.question_tokens, 100 + turn, vocab)
            out = burst(core, [list(conversation)], params)
            ttft += out["ttft"]
            tokens, seconds = tokens + out["tokens"], seconds + out["seconds"]
            conversation += _tokens(args.max_tokens, 200 + turn, vocab)  # stands for the reply
        result = {"ttft": ttft, "tokens": tokens, "seconds": seconds}
    else:
        if name == "shared":
            system = _tokens(args.system_tokens, 1, vocab)
            prompts = [system + _tokens(args.question_tokens, 10 + i, vocab) for i in range(args.requests + 1)]
        else:
            prompts = [_tokens(500, 2, vocab)] * (args.requests + 1)
        burst(core, prompts[:1], params)  # the prefix arrives once before the burst
        hits = core.stats()["prefix_cache_hits"]
        result = burst(core, prompts[1:], params)
    ttft = result["ttft"]
    return {"workload": name, "requests": len(ttft), "ttft_p50_ms": round(statistics.median(ttft) * 1e3, 1),
            "ttft_mean_ms": round(statistics.fmean(ttft) * 1e3, 1),
            "output_tokens_per_s": round(result["tokens"] / result["seconds"], 1),
            "cached_prompt_tokens": core.stats()["prefix_cache_hits"] - hits}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi4-mini-flash", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--question-tokens", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prefix-cache-gb", type=float, default=2.0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    with device:
        model = sambay.SambaY(PRESETS[args.preset]).init_weights(torch.Generator(device).manual_seed(0))
    model = model.to_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    engine, rows = Engine(model), []
    length = args.system_tokens + 10 * (args.question_tokens + args.max_tokens) + 64
    for gb in (args.prefix_cache_gb, 0.0):
        config = SchedulerConfig(slots=args.requests, max_length=length, max_waiting=4 * args.requests,
                                 prefix_cache_bytes=int(gb * 1e9))
        core = EngineCore(engine, config)
        for name in ("shared", "samples", "chat"):
            row = {"prefix_cache": gb > 0, **workload(core, name, args, model.config.vocab_size)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del core
    print("| workload | prefix cache | TTFT p50 / mean ms | output tok/s | cached prompt tokens |")
    for r in rows:
        print(f"| {r['workload']} | {'on' if r['prefix_cache'] else 'off'} | {r['ttft_p50_ms']} / {r['ttft_mean_ms']} "
              f"| {r['output_tokens_per_s']} | {r['cached_prompt_tokens']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
