"""`sambay bench-serve`: load a running `sambay serve` (loopback only) and report throughput and latency.

    sambay bench-serve --concurrency 16 --requests 128 --max-tokens 128
    sambay bench-serve --workload paper --concurrency 8 --requests 16 --model-dir DIR
    sambay bench-serve --request-rate 4 --requests 200 --prompt-tokens 512 2048 --json

Two ways to load the server: ``--concurrency C`` keeps C requests in flight (closed loop), and
``--request-rate R`` sends R requests/s on average, as Poisson arrivals from ``--seed`` (open loop; then
``--concurrency``, if given, caps those in flight). ``--workload`` picks prompt lengths, output length and
sampling at once (``default``: 16/64/128-word prompts, 64 tokens; ``paper``: 2,048-token prompts, 32,768
tokens, greedy); the flags given explicitly override it. Reports requests/s, output tokens/s, time to
first token, inter-token and end-to-end latency percentiles, failures, the mean prompt and output tokens,
and, with ``--model-dir`` (the served checkpoint, read for its config and weight bytes only), the decode
bandwidth limit at the run's mean context and the fraction of it reached; without it the limit is left
out. See `sambay.serve.loadgen`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sambay.cli._common import UsageError

if TYPE_CHECKING:
    from sambay.serve.loadgen import LoadConfig

HELP = "load-test a running server: requests/s, tokens/s, TTFT, inter-token latency, the bandwidth limit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--workload", choices=("default", "paper"), default="default",
                   help="default: 16/64/128-word prompts, 64 tokens; paper: 2,048-token prompts, 32,768 tokens, "
                        "greedy, 3,600 s timeout (flags given override it)")
    p.add_argument("--concurrency", type=int,
                   help="requests in flight (default: 8); with --request-rate, a cap on them (default: none)")
    p.add_argument("--request-rate", type=float, help="requests/s, Poisson arrivals (default: closed loop)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and token-id prompts (default: 0)")
    p.add_argument("--requests", type=int, default=64, help="requests in total (default: 64)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of each request")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-words", type=int, nargs="+", help="prompt lengths in words, cycled")
    prompts.add_argument("--prompt-tokens", type=int, nargs="+", help="prompt lengths in tokens (sent as ids), cycled")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--timeout", type=float, help="seconds per request, send to last token (default: 300)")
    p.add_argument("--api-key", help="bearer token, if the server wants one")
    p.add_argument("--workers", type=int, help="client processes (default: one per 16 streams, at most the CPUs)")
    p.add_argument("--json-schema", type=Path, metavar="FILE",
                   help="send this JSON Schema with every request (response_format): the cost of a grammar")
    p.add_argument("--model-dir", type=Path, help="the served checkpoint: report the decode bandwidth limit")
    p.add_argument("--bandwidth", type=float, help="memory bandwidth in bytes/s for the limit (default: 4.3e12, H200)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        from sambay.serve.loadgen import H200_BANDWIDTH, ModelFootprint, run_load
    except ImportError as e:
        raise RuntimeError(f"bench-serve needs the serve extra (pip install 'sambay[serve]'): {e}") from None
    try:
        config = load_config(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    footprint = ModelFootprint.read(args.model_dir) if args.model_dir else None  # before the load, not after
    report = asyncio.run(run_load(config, footprint, args.bandwidth or H200_BANDWIDTH))
    print(json.dumps(report) if args.json else _format(report))
    return 0 if report["failed"] == 0 else 1


def load_config(args: argparse.Namespace) -> LoadConfig:
    """The `LoadConfig` of the flags: the workload's settings, overridden by the flags given."""
    from sambay.serve.loadgen import WORKLOADS, LoadConfig

    given = {"max_tokens": args.max_tokens, "temperature": args.temperature, "timeout_s": args.timeout}
    settings = {**WORKLOADS[args.workload], **{k: v for k, v in given.items() if v is not None}}
    if args.prompt_words or args.prompt_tokens:
        settings["prompt_unit"] = "words" if args.prompt_words else "tokens"
        settings["prompt_lengths"] = tuple(args.prompt_words or args.prompt_tokens)
    concurrency = args.concurrency if args.concurrency is not None or args.request_rate else 8
    schema = None
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e}") from None
    return LoadConfig(url=args.url, model=args.model, concurrency=concurrency, request_rate=args.request_rate,
                      requests=args.requests, seed=args.seed, api_key=args.api_key, workers=args.workers,
                      json_schema=schema, **settings)


def _format(report: dict) -> str:
    pace = (f"{report['request_rate']} requests/s (cap {report['concurrency']})" if report["request_rate"]
            else f"concurrency {report['concurrency']}")
    lines = [f"model {report['model']}: {report['completed']}/{report['requests']} requests at {pace} in "
             f"{report['duration_s']} s ({report['mean_in_flight']} in flight on average)",
             f"  {report['requests_per_s']} requests/s, {report['output_tokens_per_s']} output tokens/s "
             f"({report['output_tokens']} tokens; per request {report['mean_prompt_tokens']} prompt, "
             f"{report['mean_output_tokens']} output tokens)"]
    for key, label in (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency"),
                       ("latency_ms", "end-to-end latency")):
        p = report[key]
        lines.append(f"  {label:>20} ms: p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  mean {p['mean']}")
    limit = report.get("bandwidth_limit")
    if limit is None:
        lines.append("  bandwidth limit: not computed (pass --model-dir)")
    else:
        lines.append(f"  bandwidth limit at batch {limit['batch']}, context {limit['mean_context']}: "
                     f"{limit['limit_output_tokens_per_s']} output tokens/s; reached {limit['fraction_of_limit']:.1%}")
    lines += [f"  error ({count}x): {message}" for message, count in report["errors"].items()]
    return "\n".join(lines)
