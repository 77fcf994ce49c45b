"""The model in its own process: the HTTP server and the scheduler stop competing for one GIL.

    HTTP process                                    engine process
    event loop ─ RemoteScheduler.submit ── pipe ──► commands ─► EngineCore (its own thread) ─► GPU
               ◄─ sinks ◄─ receiver thread ◄─ pipe ── one message per step: outputs, admissions, stats

In one process, the event loop (an SSE chunk per token per stream) and the scheduler thread take turns
on the GIL; every torch call of the scheduler can wait for the loop, and on an H200 the server
reached two thirds of the scheduler's own throughput (docs/benchmarks.md). vLLM separates them the
same way. `RemoteScheduler` has the interface `Runtime` uses (`submit`, `cancel`, `stats`, `close`,
`closing`, `memory`, `max_length`): requests are checked here against the engine's `Limits`, so bad
ones fail at once with the same errors; the engine process loads the model itself and reports each
step's outputs in one message, which a receiver thread hands to the requests' sinks.

If the engine process dies, every open request ends with an error and new ones get 503.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sambay.generate.requests import (
    Output,
    QueueFull,
    Request,
    SchedulerClosed,
    SchedulerConfig,
    deliver,
    refuse_if_busy,
)
from sambay.generate.sampling import SamplingParams

log = logging.getLogger("sambay.serve")


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads (the arguments of `Engine.load`) and how it schedules."""

    model_dir: str
    tokenizer_dir: str
    device: str | None
    dtype: str | None  # a torch dtype name ("bfloat16"); None: the checkpoint's
    scheduler: SchedulerConfig
    cache_memory_bytes: int | None = None  # size the K/V pool to this budget (`kv_blocks_for_budget`)
    adapters: tuple[str, ...] = ()  # LoRA adapter directories to serve, in slot order (`attach_adapters`)


class RemoteScheduler:
    """An `EngineCore` running in a child process, seen through the interface `Runtime` uses.

    Args:
        spec: what to load and how to schedule.
        start_timeout: seconds to wait for the model to load.
    """

    def __init__(self, spec: EngineSpec, start_timeout: float = 900.0):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_main, args=(child, spec), name="sambay-engine", daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self._process.kill()
            raise RuntimeError(f"the engine process did not load the model in {start_timeout:.0f} s")
        kind, *info = self._conn.recv()
        if kind == "failed":
            self._process.join(5)
            raise RuntimeError(f"the engine process failed to start: {info[0]}")
        self.limits, self.memory, self._stats = info
        self.max_length, self.config = self.limits.max_length, spec.scheduler
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self._waiting = 0  # submitted here, not yet admitted there
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="sambay-engine-receiver", daemon=True)
        self._receiver.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "waiting": max(self._stats["waiting"], self._waiting)}

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Output], None],
               adapter: int = 0) -> Request:
        """As `EngineCore.submit`: the same checks and errors, then the request goes to the engine process."""
        prompt = [int(i) for i in prompt]
        self.limits.check(prompt, params, adapter)
        request = Request(self, prompt, params, sink, adapter)
        with self._lock:
            refuse_if_busy(self._closing, self._waiting, self.config.max_waiting)
            self._requests[request.id] = request
            self._waiting += 1
        self._send(("submit", request.id, prompt, params, adapter))
        return request

    def cancel(self, request: Request) -> None:
        self._send(("cancel", request.id))

    def close(self, grace: float = 30.0) -> None:
        """Refuse new requests; the engine lets running ones finish for ``grace`` s, aborts the rest, exits."""
        with self._lock:
            if self._closing and self._closed.is_set():
                return
            self._closing = True
        self._send(("close", grace))
        self._closed.wait(grace + 60)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
        self._fail_all("the server shut down before the request finished")

    # internals ------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the engine process is gone: the receiver fails the requests
            pass

    def _receive(self) -> None:
        try:
            while True:
                kind, *body = self._conn.recv()
                if kind == "closed":
                    break
                if kind == "refused":
                    request_id, error = body
                    self._finish(request_id, Output((), finished=True, error=error))
                    continue
                outputs, admitted, stats = body
                with self._lock:
                    self._stats = stats
                    self._waiting -= len(admitted)
                for request_id, at in admitted:
                    request = self._requests.get(request_id)
                    if request is not None:
                        request.timing.admitted = at
                for request_id, output in outputs:
                    self._finish(request_id, output)
        except (EOFError, OSError):
            log.error("the engine process exited")
        with self._lock:
            self._closing = True
        self._closed.set()
        self._fail_all("the engine process stopped")

    def _finish(self, request_id: int, output: Output) -> None:
        """Hand ``output`` to its request (the last one forgets the request)."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                return
            if output.finished:
                del self._requests[request_id]
                if request.timing.admitted is None:
                    self._waiting -= 1
        if output.deltas:
            request.timing.first_token = request.timing.first_token or output.time
        deliver(request, output)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
            self._waiting = 0
        for request in requests:
            deliver(request, Output((), finished=True, error=message))


def _engine_main(conn, spec: EngineSpec) -> None:
    """The engine process: load, report the limits, then run commands until told to close."""
    import torch

    from sambay.generate import Engine
    from sambay.generate.core import EngineCore, sized_for_budget

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    outbox: list[tuple[int, Output]] = []
    handles: dict[int, Request] = {}  # until finished: for cancellation
    unadmitted: dict[int, Request] = {}  # until the parent has heard of their admission
    finished_early: set[int] = set()  # finished before `submit` returned here (registered nowhere)
    lock, send_lock = threading.Lock(), threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def flush() -> None:
        """After each step: its outputs, the requests it admitted and the stats, in one message."""
        with lock:
            batch, outbox[:] = list(outbox), []
            admitted = [(i, r.timing.admitted) for i, r in unadmitted.items() if r.timing.admitted is not None]
            for i, _ in admitted:
                del unadmitted[i]
        if batch or admitted:
            send(("step", batch, admitted, scheduler.stats()))

    def sink(request_id: int) -> Callable[[Output], None]:
        def put(output: Output) -> None:
            with lock:
                outbox.append((request_id, output))
                if output.finished:
                    if handles.pop(request_id, None) is None:
                        finished_early.add(request_id)
                    unadmitted.pop(request_id, None)
        return put

    try:
        engine = Engine.load(spec.model_dir, tokenizer_dir=spec.tokenizer_dir, device=spec.device,
                             dtype=getattr(torch, spec.dtype) if spec.dtype else None, progress=False)
        if spec.adapters:
            from sambay.lora import attach_adapters, read_adapter

            attach_adapters(engine.model, [read_adapter(d) for d in spec.adapters])
        config = spec.scheduler
        if spec.cache_memory_bytes is not None:
            config = sized_for_budget(config, engine.model, spec.cache_memory_bytes)
        scheduler = EngineCore(engine, config, on_step=flush)
        send(("ready", scheduler.limits, scheduler.memory, scheduler.stats()))
    except Exception as e:  # reported to the parent, which raises it
        send(("failed", f"{type(e).__name__}: {e}"))
        return
    scheduler.start()
    while True:
        kind, *body = conn.recv()
        if kind == "submit":
            request_id, prompt, params, adapter = body
            try:
                handle = scheduler.submit(prompt, params, sink(request_id), adapter)
            except (ValueError, QueueFull, SchedulerClosed) as e:
                send(("refused", request_id, str(e)))
                continue
            with lock:
                if request_id in finished_early:
                    finished_early.discard(request_id)
                else:
                    handles[request_id] = handle
                    unadmitted[request_id] = handle
        elif kind == "cancel":
            with lock:
                handle = handles.get(body[0])
            if handle is not None:
                handle.cancel()
        elif kind == "close":
            scheduler.close(body[0])
            flush()
            send(("closed",))
            return
