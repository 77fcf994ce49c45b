"""`sambay serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra).

    sambay serve --model DIR                              127.0.0.1:8000, 8 sequences of up to max_seq_len
    sambay serve --model DIR --slots 64 --max-length 8192
    sambay serve --model DIR --slots 64 --cache-memory-gb 20    64 sequences sharing 20 GB of cache
    sambay serve --model DIR --api-key KEY                requests need "Authorization: Bearer KEY"

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming or not), /health, /metrics.
Memory is decided at start: --slots sequences of constant state (Mamba, sliding window) and a pool of
shared-K/V blocks that sequences take as they grow (`sambay.generate.blocks`); by default the pool can
hold every slot at --max-length, with --cache-memory-gb it is what fits in that budget, and requests are
preempted and recomputed when it runs out. SIGTERM stops accepting requests, lets in-flight ones
finish for --shutdown-grace seconds, then aborts the rest.
"""

from __future__ import annotations

import argparse
import logging

from sambay.cli._common import UsageError, add_model_arguments, add_sampling_arguments, load_engine, model_options
from sambay.cli._common import sampling_params as sampling_defaults
from sambay.cli._output import make_console

HELP = "serve an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients use (default: the dir name)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    group = p.add_argument_group("capacity")
    group.add_argument("--slots", type=int, default=8, help="concurrent sequences (default: 8)")
    group.add_argument("--cache-memory-gb", type=float,
                       help="cache budget: the slots' state, the rest as shared-K/V blocks (default: room for "
                            "every slot at --max-length)")
    group.add_argument("--max-length", type=int, help="prompt + completion tokens per sequence (default: max_seq_len)")
    group.add_argument("--block-size", type=int, default=128, help="tokens per shared-K/V block (default: 128)")
    group.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per request per step")
    group.add_argument("--prefill-budget", type=int, default=1024, help="prompt tokens per step, all requests")
    group.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429 (default: 64)")
    group.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish requests on SIGTERM")
    add_model_arguments(p)
    add_sampling_arguments(p)


def main(args: argparse.Namespace) -> int:
    try:
        from sambay.generate.blocks import kv_blocks_for_budget
        from sambay.generate.scheduler import SchedulerConfig
        from sambay.serve.server import ServeConfig, build_runtime, serve
    except ImportError as e:
        raise RuntimeError(f"sambay serve needs the serve extra (pip install 'sambay[serve]'): {e}") from None
    options = model_options(args)
    defaults = sampling_defaults(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = load_engine(options, make_console(stderr=True))
    max_length = args.max_length or engine.model.config.max_seq_len
    try:
        kv_blocks = None
        if args.cache_memory_gb is not None:
            kv_blocks = kv_blocks_for_budget(engine.model, args.slots, max_length, args.block_size,
                                             int(args.cache_memory_gb * 1e9)) or None
        scheduler = SchedulerConfig(slots=args.slots, max_length=max_length, block_size=args.block_size,
                                    kv_blocks=kv_blocks, prefill_chunk=args.prefill_chunk,
                                    prefill_budget=args.prefill_budget, max_waiting=args.max_waiting)
    except ValueError as e:
        raise UsageError(str(e)) from None
    config = ServeConfig(model_dir=options.model_dir, model_name=args.served_model_name, host=args.host,
                         port=args.port, api_key=args.api_key, scheduler=scheduler, defaults=defaults,
                         grace=args.shutdown_grace)
    try:
        runtime = build_runtime(engine, config)
    except ValueError as e:  # e.g. a budget too small for one sequence of --max-length
        raise UsageError(str(e)) from None
    budget = runtime.scheduler.memory
    logging.getLogger("sambay.serve").info(
        "serving %r on http://%s:%d: %d sequences of up to %d tokens, shared K/V pool of %d tokens, cache %.1f MB",
        runtime.model_name, config.host, config.port, budget.slots, budget.max_length, budget.kv_tokens,
        budget.total_bytes / 1e6)
    serve(runtime, config.host, config.port, config.grace)
    return 0
