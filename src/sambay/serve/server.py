"""Run the server: load the model, start the scheduler thread, serve with uvicorn, shut down gracefully.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes and new requests get 503 at once; admitted
and queued requests keep generating for ``grace`` seconds, after which the scheduler aborts what is
left (their streams end with an error event, non-streaming ones get 503); then the process exits.
A second signal exits at once (uvicorn's behaviour). A connection still sending its request when the
signal comes is closed at once (`sambay.serve.transport`).

What a client may send and how long it may take (body cap, idle and head timeouts, connection limit) is
enforced below the routes, by `sambay.serve.transport`'s middleware and uvicorn protocol.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from sambay.generate import REASONING_DEFAULTS, Engine, SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.requests import SchedulerConfig
from sambay.generate.runner import ModelRunner
from sambay.serve.app import create_app
from sambay.serve.runtime import Runtime
from sambay.serve.transport import BodyLimit, TransportLimits, protocol_factory

log = logging.getLogger("sambay.serve")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Where and how to serve."""

    model_dir: Path
    model_name: str | None = None  # the name clients pass as "model"; default: the directory's name
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    defaults: SamplingParams = REASONING_DEFAULTS  # for sampling fields a request leaves unset
    grace: float = 30.0  # seconds in-flight requests may keep running after SIGTERM
    limits: TransportLimits = field(default_factory=TransportLimits)  # body cap, timeouts, connections
    adapters: tuple[str, ...] = ()  # names of the LoRA adapters attached to the model, in slot order


def build_runtime(engine: Engine, config: ServeConfig, runner: ModelRunner | None = None) -> Runtime:
    """A started scheduler over ``engine`` (and ``runner``, see `EngineCore`), wrapped for the HTTP layer."""
    scheduler = EngineCore(engine, config.scheduler, runner).start()
    name = config.model_name or config.model_dir.resolve().name
    return Runtime(engine.tokenizer, scheduler, name, config.defaults, api_key=config.api_key,
                   adapters=config.adapters)


class _Server(uvicorn.Server):
    """uvicorn, plus: on the first exit signal, drain the scheduler (refuse new, finish or abort in-flight)."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, grace: float):
        super().__init__(config)
        self.runtime, self.grace = runtime, grace
        self._draining: threading.Thread | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without re-raising the caught signal on exit: after a graceful shutdown `serve`
        returns (exit status 0), so whatever follows it (a tensor-parallel run releasing its other ranks)
        still runs."""
        with super().capture_signals():
            yield
            self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        if self._draining is None:
            log.info("shutting down: finishing in-flight requests (grace %.1f s)", self.grace)
            self._draining = threading.Thread(target=self.runtime.scheduler.close, args=(self.grace,), daemon=True)
            self._draining.start()
        super().handle_exit(sig, frame)


def check_port(host: str, port: int) -> None:
    """Fail now if uvicorn could not listen on ``host:port`` later: called before the model loads, which
    can take minutes. Binds and closes a socket per address of ``host`` the way asyncio's
    ``create_server`` (uvicorn's) does: SO_REUSEADDR, so a port in TIME_WAIT passes and one in use fails.

    Raises:
        OSError: one line naming the address and port.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot serve on {host}:{port}: unknown host ({e.strerror})") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(f"cannot serve on {host}:{port}: {e.strerror} (is another server using port "
                              f"{port}? choose another with --port)") from None


SWITCH_INTERVAL_S = 0.0005


def serve(runtime: Runtime, host: str, port: int, grace: float, limits: TransportLimits | None = None) -> None:
    """Serve ``runtime`` until a signal; returns after a graceful shutdown.

    Two threads share the GIL: the event loop (HTTP, one SSE chunk per token per stream) and the
    scheduler (which releases the GIL while the GPU runs a step). Under load the loop is busy, and a
    scheduler thread whose step has finished waits up to the interpreter's switch interval (5 ms by
    default, about a decode step) to get the GIL back; a 0.5 ms interval keeps that wait small.
    uvicorn uses uvloop when installed, and httptools (the serve extra installs both).
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = make_server(runtime, host, port, grace, limits or TransportLimits())
    try:
        server.run()
    finally:
        runtime.scheduler.close(0)


def make_server(runtime: Runtime, host: str, port: int, grace: float, limits: TransportLimits) -> _Server:
    """The uvicorn server `serve` runs: the app behind `BodyLimit`, on the guarded httptools protocol.

    ``limits`` left at None are derived here (the body cap from the context); the ones in force are logged.
    WebSocket support is off: no route uses it, and an upgrade is answered as plain HTTP.
    """
    limits = limits.resolved(runtime.max_length)
    log.info("limits: request bodies up to %.1f MB, %d connections, timeouts idle %g s, head %g s, body %g s",
             limits.max_body_bytes / 1e6, limits.max_connections, limits.idle_timeout, limits.header_timeout,
             limits.body_timeout)
    refused = runtime.metrics.transport_refused
    app = BodyLimit(create_app(runtime), limits.max_body_bytes, limits.body_timeout, refused)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=grace + 5,
                            access_log=False, interface="asgi3", http=protocol_factory(limits, refused), ws="none",
                            timeout_keep_alive=limits.idle_timeout)
    return _Server(config, runtime, grace)
