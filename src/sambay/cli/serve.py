"""`sambay serve`: an OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra).

    sambay serve --model DIR                              127.0.0.1:8000, 8 sequences of up to max_seq_len
    sambay serve --model DIR --slots 64 --max-length 8192
    sambay serve --model DIR --slots 64 --cache-memory-gb 20    64 sequences sharing 20 GB of cache
    sambay serve --model DIR --api-key KEY                requests need "Authorization: Bearer KEY"
    sambay serve --model DIR --lora math=ADAPTER_DIR --lora code=DIR2    "model": "math" selects an adapter
    python -m torch.distributed.run --nproc-per-node 2 -m sambay.cli serve --tensor-parallel 2 --model DIR

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming or not), /health, /metrics.
On a GPU the model and scheduler run in a process of their own (--engine-process; see
`sambay.serve.engine_process`). Memory is decided at start: --slots sequences of constant state
(Mamba, sliding window) and a pool of shared-K/V blocks that sequences take as they grow
(`sambay.generate.blocks`); by default the pool can hold every slot at --max-length, with
--cache-memory-gb it is what fits in that budget, and requests are preempted and recomputed when it
runs out. --lora NAME=DIR (repeatable) serves PEFT LoRA adapters beside the base model, unmerged: a
request's "model" picks one, and requests of every adapter and of the base share each step (a gathered
LoRA matmul, `sambay.lora`); not yet with --tensor-parallel. SIGTERM stops accepting requests, lets
in-flight ones finish for --shutdown-grace seconds, then aborts the rest. A port already in use is
reported before the model loads. What one client may send and hold (--max-body-mb, --max-connections,
--idle-timeout, --header-timeout, --body-timeout) is enforced by `sambay.serve.transport`; the README's
Security section says what is left to a reverse proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
from dataclasses import replace
from pathlib import Path

from sambay.cli._common import UsageError, add_model_arguments, add_sampling_arguments, load_engine, model_options
from sambay.cli._common import sampling_params as sampling_defaults
from sambay.cli._output import make_console

HELP = "serve an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model name clients use (default: the dir name)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: none, no key needed)")
    p.add_argument("--lora", metavar="NAME=DIR", action="append", type=_lora_spec, default=[],
                   help="serve the PEFT LoRA adapter in DIR as model NAME, batched with the base model (repeatable; "
                        "default: none)")
    group = p.add_argument_group("capacity")
    group.add_argument("--slots", type=int, default=8, help="concurrent sequences (default: 8)")
    group.add_argument("--cache-memory-gb", type=float,
                       help="cache budget: the slots' state, the rest as shared-K/V blocks (default: room for "
                            "every slot at --max-length)")
    group.add_argument("--max-length", type=int, help="prompt + completion tokens per sequence (default: max_seq_len)")
    group.add_argument("--block-size", type=int, default=128, help="tokens per shared-K/V block (default: 128)")
    group.add_argument("--prefill-chunk", type=int, default=512,
                       help="prompt tokens per request per step while other rows decode (default: 512)")
    group.add_argument("--prefill-budget", type=int, default=2048, help="prompt tokens per step, all requests "
                       "(default: 2048; also the chunk of a prompt when nothing decodes)")
    group.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429 (default: 64)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step before capturing its CUDA graphs (GPU): about 6%% more "
                            "tokens/s at batch 1-8 on an H200, tens of seconds more at start (default: off)")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                       help="plan step n+1 while the host processes step n's tokens (default: on)")
    group.add_argument("--prefix-cache-gb", "--prefix-cache-memory-gb", dest="prefix_cache_gb",
                       type=float, default=2.0, metavar="GB",
                       help="memory for prefix-cache state snapshots, beside --cache-memory-gb: a prompt that starts "
                            "with a cached prefix prefills only the rest (default: 2; 0 turns prefix caching off)")
    group.add_argument("--shutdown-grace", type=float, default=30.0,
                       help="seconds to finish requests on SIGTERM (default: 30)")
    _add_transport_arguments(p)
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                   help="run the model in its own process, so HTTP and the scheduler do not share a GIL "
                        "(default: on for CUDA devices)")
    p.add_argument("--tensor-parallel", type=int, metavar="N", help="shard the model over N processes started by "
                   "torchrun (python -m torch.distributed.run --nproc-per-node N -m sambay.cli serve ...); "
                   "--cache-memory-gb is then per process (default: off, one process)")
    add_model_arguments(p)
    add_sampling_arguments(p)


def _add_transport_arguments(p: argparse.ArgumentParser) -> None:
    """What one client may send and hold (`sambay.serve.transport`); the README's Security section."""
    group = p.add_argument_group("connections")
    group.add_argument("--max-body-mb", type=_positive(float), metavar="MB",
                       help="refuse a larger request body with 413 before reading it (default: 4 MB plus 16 bytes "
                            "per token of --max-length)")
    group.add_argument("--max-connections", type=_positive(int), metavar="N",
                       help="open connections; past them a new one gets 503 at once (default: the open-file limit, "
                            "ulimit -n, less a tenth)")
    group.add_argument("--idle-timeout", type=_positive(float), default=5.0, metavar="S",
                       help="close a connection that starts no request for S seconds, new or after a response "
                            "(default: 5)")
    group.add_argument("--header-timeout", type=_positive(float), default=10.0, metavar="S",
                       help="close a connection whose request head is incomplete S seconds after its first byte "
                            "(default: 10)")
    group.add_argument("--body-timeout", type=_positive(float), default=30.0, metavar="S",
                       help="answer 408 to a request body still incomplete S seconds after its head (default: 30)")


def _positive(kind):
    """An argparse type: ``kind`` values above zero (a usage error otherwise, before the model loads)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid <type> value" message
    return parse


def _lora_spec(text: str) -> tuple[str, str]:
    """An argparse type: ``NAME=DIR`` with a non-empty name and an existing directory → (name, dir)."""
    name, sep, directory = text.partition("=")
    if not sep or not name.strip() or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(f"{name}: adapter directory {directory} does not exist")
    return name.strip(), directory


def _read_adapters(args: argparse.Namespace, model_name: str) -> list:
    """The --lora adapters, read and checked on their own before the model loads (names unique, none the base
    model's); refused with --tensor-parallel, whose sharding does not split the adapters yet."""
    if not args.lora:
        return []
    if args.tensor_parallel is not None:
        raise UsageError("--lora does not combine with --tensor-parallel yet (the adapters are not sharded)")
    names = [name for name, _ in args.lora]
    for name in names:
        if name == model_name or names.count(name) > 1:
            owner = "the base model" if name == model_name else "another --lora"
            raise UsageError(f"--lora {name}: the name is already taken (by {owner})")
    from sambay.lora import read_adapter

    return [read_adapter(directory) for _, directory in args.lora]


def _transport_limits(args: argparse.Namespace):
    from sambay.serve.transport import TransportLimits

    body = None if args.max_body_mb is None else int(args.max_body_mb * 1e6)
    return TransportLimits(max_body_bytes=body, max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                           header_timeout=args.header_timeout, body_timeout=args.body_timeout)


def main(args: argparse.Namespace) -> int:
    try:
        from sambay.serve.server import check_port  # the serve extra: FastAPI, uvicorn, prometheus_client
    except ImportError as e:
        raise RuntimeError(f"sambay serve needs the serve extra (pip install 'sambay[serve]'): {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = _directories(model_options(args))
    from sambay.cli._common import check_serving_cache
    check_serving_cache(args, options)  # before the model loads, like the port
    adapters = _read_adapters(args, args.served_model_name or options.model_dir.resolve().name)
    if args.tensor_parallel is not None:
        if args.engine_process:
            raise UsageError("--engine-process does not combine with --tensor-parallel yet (rank 0 runs the "
                             "model next to the HTTP server)")
        return _serve_tensor_parallel(args, options)
    check_port(args.host, args.port)  # before the model loads, which can take minutes
    engine_process = options.device.startswith("cuda") if args.engine_process is None else args.engine_process
    if engine_process:
        return _serve_engine_process(args, options)
    engine = load_engine(options, make_console(stderr=True))
    if adapters:
        from sambay.lora import attach_adapters

        attach_adapters(engine.model, adapters)  # before the runner binds its adapter index and captures graphs
    return _serve(args, options, engine, _scheduler_config(args, engine.model))


def _directories(options):
    """``--model DIR/config.json`` (or any file in DIR) means DIR; likewise for --tokenizer."""
    from sambay.checkpoint import model_directory

    model_dir = model_directory(options.model_dir)
    tokenizer_dir = options.tokenizer_dir
    if tokenizer_dir == options.model_dir:
        tokenizer_dir = model_dir
    elif tokenizer_dir.is_file():
        tokenizer_dir = tokenizer_dir.parent
    return replace(options, model_dir=model_dir, tokenizer_dir=tokenizer_dir)


def _scheduler_config(args: argparse.Namespace, model=None, cuda_graph: bool = True):
    """The scheduler's capacity from the flags. --cache-memory-gb is sized for this process's (shard of the)
    model; without ``model`` (the engine process loads it) the default length and the pool are left to it."""
    from sambay.generate.core import sized_for_budget
    from sambay.generate.requests import SchedulerConfig

    try:
        config = SchedulerConfig(slots=args.slots, max_length=args.max_length, block_size=args.block_size,
                                 prefill_chunk=args.prefill_chunk, prefill_budget=args.prefill_budget,
                                 max_waiting=args.max_waiting, cuda_graph=cuda_graph,
                                 compile=args.compile and cuda_graph, async_scheduling=args.async_scheduling,
                                 prefix_cache_bytes=max(0, int(args.prefix_cache_gb * 1e9)))
        if model is None:
            return config
        config = dataclasses.replace(config, max_length=config.max_length or model.config.max_seq_len)
        if args.cache_memory_gb is not None:
            config = sized_for_budget(config, model, int(args.cache_memory_gb * 1e9))
        return config
    except ValueError as e:
        raise UsageError(str(e)) from None


def _make_runner(model, scheduler, cls=None):
    from sambay.generate.core import make_runner

    try:
        return make_runner(model, scheduler) if cls is None else make_runner(model, scheduler, cls)
    except ValueError as e:  # e.g. a budget too small for one sequence of --max-length
        raise UsageError(str(e)) from None


def _serve(args: argparse.Namespace, options, engine, scheduler, runner=None) -> int:
    """Serve HTTP over a scheduler on ``engine`` until SIGTERM."""
    from sambay.serve.server import ServeConfig, build_runtime, serve

    config = ServeConfig(model_dir=options.model_dir, model_name=args.served_model_name, host=args.host,
                         port=args.port, api_key=args.api_key, scheduler=scheduler,
                         defaults=sampling_defaults(args), grace=args.shutdown_grace, limits=_transport_limits(args),
                         adapters=tuple(name for name, _ in args.lora))
    runtime = build_runtime(engine, config, runner or _make_runner(engine.model, scheduler))
    budget = runtime.scheduler.memory
    logging.getLogger("sambay.serve").info(
        "serving %r on http://%s:%d: %d sequences of up to %d tokens, shared K/V pool of %d tokens, cache %.1f MB",
        runtime.model_name, config.host, config.port, budget.slots, budget.max_length, budget.kv_tokens,
        budget.total_bytes / 1e6)
    serve(runtime, config.host, config.port, config.grace, config.limits)
    return 0


def _serve_engine_process(args: argparse.Namespace, options) -> int:
    """HTTP here, the model and scheduler in a child process (`sambay.serve.engine_process`)."""
    from sambay.serve.engine_process import EngineSpec, RemoteScheduler
    from sambay.serve.runtime import Runtime
    from sambay.serve.server import serve
    from sambay.tokenizer import load_tokenizer

    scheduler = _scheduler_config(args)
    if not (options.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{options.model_dir} has no config.json: is it a model directory?")
    tokenizer = load_tokenizer(options.tokenizer_dir)
    budget = None if args.cache_memory_gb is None else int(args.cache_memory_gb * 1e9)
    spec = EngineSpec(model_dir=str(options.model_dir), tokenizer_dir=str(options.tokenizer_dir),
                      device=options.device, dtype=str(options.dtype).removeprefix("torch.") if options.dtype else None,
                      scheduler=scheduler, cache_memory_bytes=budget,
                      adapters=tuple(directory for _, directory in args.lora))
    try:
        remote = RemoteScheduler(spec)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    runtime = Runtime(tokenizer, remote, args.served_model_name or options.model_dir.resolve().name,
                      sampling_defaults(args), api_key=args.api_key, adapters=tuple(name for name, _ in args.lora))
    memory = remote.memory
    logging.getLogger("sambay.serve").info(
        "serving %r on http://%s:%d (model in its own process): %d sequences of up to %d tokens, shared K/V "
        "pool of %d tokens, cache %.1f MB", runtime.model_name, args.host, args.port, memory.slots,
        memory.max_length, memory.kv_tokens, memory.total_bytes / 1e6)
    serve(runtime, args.host, args.port, args.shutdown_grace, _transport_limits(args))
    return 0


def _serve_tensor_parallel(args: argparse.Namespace, options) -> int:
    """Every rank loads the model and keeps its shard; rank 0 serves HTTP and schedules, and its runner
    broadcasts each forward and cache operation to the other ranks, which follow until it stops."""
    from sambay import parallel
    from sambay.parallel.serving import BroadcastRunner, follow
    from sambay.serve.server import check_port

    if args.tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    with parallel.torchrun_group(args.tensor_parallel, options.device) as member:
        if member.rank == 0:  # the rank that serves HTTP; fail before every rank loads the model
            check_port(args.host, args.port)
        # CUDA-graph capture of the all-reduces is untested: decode runs eagerly under tensor parallelism
        engine = load_engine(replace(options, device=member.device), make_console(stderr=True), cuda_graphs=False)
        parallel.tensor_parallel(engine.model)
        scheduler = _scheduler_config(args, engine.model, cuda_graph=False)
        if member.rank > 0:
            # shutdown is rank 0's to drive: it finishes in-flight requests (which need every rank), then
            # sends STOP; a signal here (torchrun forwards SIGTERM, a terminal sends SIGINT) must not cut that short
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            follow(_make_runner(engine.model, scheduler))
            return 0
        runner = _make_runner(engine.model, scheduler, BroadcastRunner)
        try:
            return _serve(args, options, engine, scheduler, runner)
        finally:
            runner.stop()
