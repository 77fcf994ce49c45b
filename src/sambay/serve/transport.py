"""What `sambay serve` guards against below the routes: request size, slow or idle clients, too many connections.

uvicorn, as configured by default, reads a request body of any size into memory before the app can refuse
it, never closes a connection that has not sent a request head (one byte a second keeps it open for ever),
accepts connections until the process runs out of file descriptors, and answers an HTTP/1.0 client with
chunked encoding, which HTTP/1.0 does not have. This module closes those gaps, in two layers:

- `BodyLimit`, an ASGI middleware around the app: a body whose Content-Length is over the cap is refused
  with 413 before any of it is read; a chunked one is read up to the cap and then refused; a body that has
  not arrived ``body_timeout`` seconds after its head gets 408. The app receives the whole body in one
  message, so a route never sees a half-read request.
- `GuardedHttpToolsProtocol`, uvicorn's httptools protocol with one deadline per connection: a connection
  that is waiting for a request (new, or after a response) is closed after ``idle_timeout`` seconds, bytes
  that start no request (the tail of a refused body) do not extend it; a request head must be complete
  ``header_timeout`` seconds after its first byte and within `MAX_HEAD_BYTES` (431 otherwise). Past
  ``max_connections`` (by default derived from the open-file limit, with headroom) a new connection is
  answered 503 at once and closed, before the process runs out of descriptors. A response of unknown length
  to an HTTP/1.0 client is sent as is and ends with the connection (no chunked encoding). On shutdown, a
  connection still sending its request is closed at once instead of holding the graceful shutdown open.

What these limits do not do (per-client rate limits, TLS) is left to a reverse proxy; see the README.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from sambay.serve.schemas import ErrorResponse

log = logging.getLogger("sambay.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; nginx allows 4 x 8 KB, h11 16 KB
_WARN_EVERY_S = 60.0  # "connection limit reached" is logged at most this often, not once per refused connection


@dataclass(frozen=True, kw_only=True)
class TransportLimits:
    """Limits on what one connection may send, and on how many may be open."""

    max_body_bytes: int | None = None  # request body cap; None: `default_max_body_bytes` of the context
    max_connections: int | None = None  # open connections; None: `default_max_connections()`
    idle_timeout: float = 5.0  # seconds a connection may wait for its next request (uvicorn's keep-alive)
    header_timeout: float = 10.0  # seconds from a request's first byte to the end of its head
    body_timeout: float = 30.0  # seconds from the end of a request's head to the end of its body

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections", "idle_timeout", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def resolved(self, max_length: int) -> TransportLimits:
        """These limits with the defaults filled in for a server of ``max_length`` tokens per sequence."""
        body = self.max_body_bytes or default_max_body_bytes(max_length)
        return TransportLimits(max_body_bytes=body, max_connections=self.max_connections or default_max_connections(),
                               idle_timeout=self.idle_timeout, header_timeout=self.header_timeout,
                               body_timeout=self.body_timeout)


def default_max_body_bytes(max_length: int) -> int:
    """A few MB more than the longest prompt the context allows: 16 bytes per token (a token is about 4 bytes
    of text, a non-ASCII one up to 12 as JSON ``\\uXXXX`` escapes) plus 4 MB for everything else."""
    return 16 * max_length + 4_000_000


def default_max_connections() -> int:
    """The open-file limit less a tenth (at least 64) for everything else the process opens: model files,
    logs, the engine process's pipes, and connections being refused."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(1, soft - max(64, soft // 10))


def _error_json(status: int, message: str, code: str) -> JSONResponse:
    """An OpenAI-format error response (a Starlette response, itself an ASGI app); a 503 carries Retry-After."""
    kind = "service_unavailable_error" if status == 503 else "invalid_request_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(ErrorResponse.of(message, kind, code=code), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: reads a request's body, within ``max_bytes`` and ``timeout`` seconds, before ``app`` runs."""

    def __init__(self, app, max_bytes: int, timeout: float, on_refusal: Callable[[str], None] = lambda reason: None):
        self.app, self.max_bytes, self.timeout, self.on_refusal = app, max_bytes, timeout, on_refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _content_length(scope) > self.max_bytes:  # refused before a byte of the body is read
            self.on_refusal("body_too_large")
            return await self._too_large()(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except TimeoutError:
            self.on_refusal("body_timeout")
            response = _error_json(408, f"the request body did not arrive within {self.timeout:g} s", "request_timeout")
            response.headers["connection"] = "close"  # the rest of the body would be read as a new request
            return await response(scope, receive, send)
        except _TooLarge:
            self.on_refusal("body_too_large")
            return await self._too_large()(scope, receive, send)
        if body is not None:  # None: the client went away
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                raise _TooLarge
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self):
        # keep-alive: uvicorn discards the rest of the body until the idle deadline closes the connection, so
        # a client that sends it all before reading (most do) still reads its 413 instead of a reset
        return _error_json(413, f"the request body is over this server's limit of {self.max_bytes:,} bytes",
                          "request_too_large")


class _TooLarge(Exception):
    pass


def _content_length(scope) -> int:
    """The declared body size; 0 if none (chunked or no body). httptools has rejected malformed values."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value)
    return 0


def _replay(body: bytes, receive):
    """A ``receive`` that gives the app the body once, then what the connection says (disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    """The bytes of an error response sent before a request cycle exists (no ASGI app to send it)."""
    response = _error_json(status, message, code)
    head = [f"HTTP/1.1 {status} {reason}".encode()]
    head += [name + b": " + value for name, value in response.raw_headers]
    head += [b"connection: close", b"", b""]
    return b"\r\n".join(head) + response.body


class _CloseDelimitedCycle(RequestResponseCycle):
    """An HTTP/1.0 request's cycle: a response without Content-Length is sent unframed and ends with the
    connection (HTTP/1.0 has no chunked encoding; uvicorn's cycle would add it; uvicorn already closes
    HTTP/1.0 connections after each response)."""

    close_delimited = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            headers = message.get("headers", ())
            if not any(name.lower() == b"content-length" for name, _ in headers):
                self.close_delimited = True
                self.chunked_encoding = False  # uvicorn adds Transfer-Encoding: chunked only while this is None
        elif self.close_delimited and message["type"] == "http.response.body":
            # uvicorn counts a body down from Content-Length; a close-delimited one has none: declare each chunk
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the idle and head deadlines, the head size cap, the connection limit,
    close-delimited HTTP/1.0 responses and a prompt shutdown of half-sent requests (see the module docstring).

    Built per connection by uvicorn through `protocol_factory`."""

    def __init__(self, *args, limits: TransportLimits, warned: list[float], on_refusal: Callable[[str], None],
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self._warned, self.on_refusal = limits, warned, on_refusal
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None  # bytes of the request head read so far; None between heads

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm(self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_bytes is not None:  # a head begun and not finished: all of ``data`` after its start is head
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.on_refusal("head_too_large")
                self.transport.write(_raw_response(431, "Request Header Fields Too Large", "the request head is "
                                                   f"over {MAX_HEAD_BYTES:,} bytes", "request_head_too_large"))
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._arm(None)  # from here the body's deadline is `BodyLimit`'s, then the app's
        super().on_headers_complete()
        if self.scope["http_version"] == "1.0" and self.cycle is not None and self.cycle.scope is self.scope:
            # uvicorn builds the cycle inside this method, with no hook to choose its class; its task has not
            # started yet, so switching the class now decides how every response byte is framed
            self.cycle.__class__ = _CloseDelimitedCycle

    def on_response_complete(self) -> None:
        waiting = not self.pipeline  # with a pipelined request queued, that request starts now: not idle
        super().on_response_complete()
        if waiting and not self.transport.is_closing():
            self._arm(self.limits.idle_timeout)

    def shutdown(self) -> None:
        """Close now a connection whose request has not fully arrived: it cannot finish during a graceful
        shutdown worth waiting for, and uvicorn would wait for it until its timeout, then cancel its task."""
        cycle = self.cycle  # with a pipelined request queued, the one responding finishes first (uvicorn's way)
        if cycle is not None and cycle.more_body and not cycle.response_complete and not self.pipeline:
            self.transport.close()
        else:
            super().shutdown()

    def _arm(self, seconds: float | None) -> None:
        """Replace the connection's deadline: close it ``seconds`` from now (None: no deadline)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None if seconds is None else self.loop.call_later(seconds, self._expire)

    def _expire(self) -> None:
        self._deadline = None
        if self._head_bytes is not None:  # a head still arriving (an idle connection is simply closed)
            self.on_refusal("head_timeout")
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        """Answer 503 and close at once: a refused connection must not hold its descriptor while the client
        reads (under a flood, waiting even a second for each exhausted the descriptors). If the client's
        request has already arrived, the close resets the connection and it may see that instead of the 503."""
        now = time.monotonic()
        if now - self._warned[0] > _WARN_EVERY_S:
            self._warned[0] = now
            log.warning("connection limit (%d) reached: new connections get 503", self.limits.max_connections)
        self.on_refusal("too_many_connections")
        transport.set_protocol(asyncio.Protocol())  # this one was never set up: its callbacks must not run
        transport.write(_raw_response(503, "Service Unavailable", "too many connections; retry later",
                                      "too_many_connections"))
        transport.close()


def protocol_factory(limits: TransportLimits, on_refusal: Callable[[str], None] = lambda reason: None):
    """What uvicorn's ``Config(http=...)`` takes: builds a `GuardedHttpToolsProtocol` per connection.
    ``on_refusal(reason)`` counts what the transport answers itself (for /metrics)."""
    if limits.max_connections is None:
        raise ValueError("resolve the limits first (TransportLimits.resolved)")
    return functools.partial(GuardedHttpToolsProtocol, limits=limits, warned=[float("-inf")], on_refusal=on_refusal)
