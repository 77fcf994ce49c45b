"""`sambay bench-serve`: load a running `sambay serve` (loopback only) and report throughput and latency.

    sambay bench-serve --concurrency 16 --requests 128 --max-tokens 128
    sambay bench-serve --url http://127.0.0.1:8000 --json

Reports requests/s, output tokens/s, and time-to-first-token and inter-token latency percentiles
(client side, see `sambay.serve.loadgen`).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from sambay.cli._common import UsageError

HELP = "load-test a running server: requests/s, tokens/s, TTFT and inter-token latency"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only)")
    p.add_argument("--model", help="model name (default: the first the server lists)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    p.add_argument("--requests", type=int, default=64, help="requests in total (default: 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default: 64)")
    p.add_argument("--prompt-words", type=int, nargs="+", default=[16, 64, 128], help="prompt lengths, cycled")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--api-key", help="bearer token, if the server wants one")
    p.add_argument("--workers", type=int, help="client processes (default: one per 16 streams, at most the CPUs)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args: argparse.Namespace) -> int:
    try:
        from sambay.serve.loadgen import LoadConfig, run_load
    except ImportError as e:
        raise RuntimeError(f"bench-serve needs the serve extra (pip install 'sambay[serve]'): {e}") from None
    try:
        config = LoadConfig(url=args.url, model=args.model, concurrency=args.concurrency, requests=args.requests,
                            prompt_words=tuple(args.prompt_words), max_tokens=args.max_tokens,
                            temperature=args.temperature, api_key=args.api_key, workers=args.workers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    report = asyncio.run(run_load(config))
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0 if report["failed"] == 0 else 1


def _print(report: dict) -> None:
    print(f"model {report['model']}: {report['completed']}/{report['requests']} requests at concurrency "
          f"{report['concurrency']} in {report['duration_s']} s")
    print(f"  {report['requests_per_s']} requests/s, {report['output_tokens_per_s']} output tokens/s "
          f"({report['output_tokens']} tokens)")
    for key, label in (("ttft_ms", "time to first token"), ("itl_ms", "inter-token latency")):
        p = report[key]
        print(f"  {label:>20} ms: p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  mean {p['mean']}")
    for error in report["errors"]:
        print(f"  error: {error}")
