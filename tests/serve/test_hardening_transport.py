"""What a hostile or broken client can do below the routes (issue 13), against the server `sambay serve` builds
(`sambay.serve.server.make_server`: the app behind `BodyLimit`, on `GuardedHttpToolsProtocol`), over raw
sockets on loopback, with limits and timeouts small enough for each test to take a second or two.

The deadlines are checked loosely (closed within several times the timeout), never to the millisecond.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time

import httpx
import pytest

from sambay.cli import __main__ as cli
from sambay.serve import transport
from sambay.serve.server import make_server
from sambay.serve.transport import MAX_HEAD_BYTES, TransportLimits
from tests.serve.conftest import MODEL, free_port, wait_for

QUICK = {"idle_timeout": 0.3, "header_timeout": 0.3, "body_timeout": 0.3}


@contextlib.contextmanager
def guarded(runtime, grace: float = 0.0, **limits):
    """The production server over the shared runtime, in a thread (no signal handlers, so no drain of the
    shared scheduler on exit); yields it and its port."""
    port = free_port()
    server = make_server(runtime, "127.0.0.1", port, grace, TransportLimits(**limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive()) and server.started, "server did not start"
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    status, headers, body = parse(data)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def is_closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (sends EOF or a reset) within ``seconds``, without sending anything."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def post_head(path: str, length: int | None, version: str = "1.1") -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()


# 1. the body cap


def test_a_body_declared_over_the_cap_is_refused_before_any_of_it_is_sent(runtime):
    with guarded(runtime, max_body_bytes=100_000) as (_, port), connect(port) as sock:
        sock.sendall(post_head("/v1/completions", 50_000_000))  # and not a byte of the 50 MB
        status, _, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_the_rest_of_a_refused_body_does_not_keep_the_connection_open(runtime):
    with guarded(runtime, max_body_bytes=100_000, **QUICK) as (_, port), connect(port) as sock:
        sock.sendall(post_head("/v1/completions", 50_000_000))
        assert read_response(sock)[0] == 413
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 5:  # the refused body, trickled: no new request begins
            try:
                sock.sendall(b"x" * 100)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            closed = closed or select.select([sock], [], [], 0.05)[0] != []
        assert closed


def test_a_chunked_body_is_read_only_up_to_the_cap(runtime):
    chunk = b"%x\r\n%s\r\n" % (50_000, b" " * 50_000)
    with guarded(runtime, max_body_bytes=100_000) as (_, port), connect(port) as sock:
        sock.sendall(post_head("/v1/completions", None) + chunk * 3)  # 150 KB, and the body never ends
        status, _, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


def test_a_client_that_sends_its_whole_large_body_still_reads_its_413(runtime):
    with guarded(runtime, max_body_bytes=100_000) as (_, port), httpx.Client(timeout=10) as http:
        url = f"http://127.0.0.1:{port}"
        r = http.post(f"{url}/v1/completions", content=b"x" * 5_000_000, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        small = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
        assert http.post(f"{url}/v1/completions", json=small).status_code == 200  # bodies under the cap pass


def test_the_default_cap_follows_the_context():
    assert transport.default_max_body_bytes(4096) == 4_065_536
    assert transport.default_max_body_bytes(262_144) > 262_144 * 12  # the release's context, escaped non-ASCII


# 2. timeouts and the connection limit


def test_an_idle_connection_is_closed_new_or_after_a_response(runtime):
    with guarded(runtime, **QUICK) as (_, port), connect(port) as fresh, connect(port) as used:
        used.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(used)[0] == 200
        assert is_closed_within(fresh, 5) and is_closed_within(used, 5)


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(runtime):
    with guarded(runtime, **QUICK) as (_, port), connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        start, closed = time.monotonic(), False
        while not closed and time.monotonic() - start < 5:  # slowloris: one header byte per 50 ms
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            closed = closed or select.select([sock], [], [], 0.05)[0] != []
        assert closed and sock.recv(1) == b""


def test_a_body_that_does_not_arrive_in_time_gets_408(runtime):
    with guarded(runtime, **QUICK) as (_, port), connect(port) as sock:
        sock.sendall(post_head("/v1/completions", 100) + b'{"prompt": ')  # and the rest never comes
        status, headers, body = parse(read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close" and b"request_timeout" in body


def test_an_oversized_request_head_is_refused(runtime):
    with guarded(runtime) as (_, port), connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(64):  # up to 1 MB of one header value, until the server answers
                sock.sendall(b"a" * 16384)
                if select.select([sock], [], [], 0.01)[0]:
                    break
        status, headers, body = parse(read_until_closed(sock))
    assert status == 431 and headers["connection"] == "close" and b"request_head_too_large" in body


def test_connections_past_the_limit_get_503_at_once(runtime):
    with guarded(runtime, max_connections=3) as (server, port):
        held = [connect(port) for _ in range(3)]
        assert wait_for(lambda: len(server.server_state.connections) == 3)
        with connect(port) as extra:
            status, headers, body = parse(read_until_closed(extra))
        assert status == 503 and "retry-after" in headers and b"too_many_connections" in body
        held.pop().close()
        assert wait_for(lambda: len(server.server_state.connections) == 2)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        for sock in held:
            sock.close()


@pytest.mark.parametrize(("soft", "expected"), [(1024, 922), (65536, 58983), (100, 36)])
def test_the_default_connection_limit_leaves_descriptors_spare(monkeypatch, soft, expected):
    monkeypatch.setattr(transport.resource, "getrlimit", lambda which: (soft, 1 << 20))
    assert transport.default_max_connections() == expected


# 3. HTTP/1.0 streams


def test_an_http10_stream_is_sent_unchunked_and_ends_with_the_connection(runtime):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}).encode()
    with guarded(runtime) as (_, port):
        with connect(port) as sock:
            sock.sendall(post_head("/v1/completions", len(body), version="1.0") + body)
            status, headers, events = parse(read_until_closed(sock))
        assert status == 200 and "transfer-encoding" not in headers and "content-length" not in headers
        assert headers["connection"] == "close"
        assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
        with connect(port) as sock:  # HTTP/1.1 keeps its chunked stream
            sock.sendall(post_head("/v1/completions", len(body)) + body)
            status, headers, _ = parse(sock.recv(65536))
        assert status == 200 and headers["transfer-encoding"] == "chunked"


# 4. shutdown


def test_shutdown_does_not_wait_for_a_request_still_being_sent(runtime):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    with guarded(runtime, grace=0.0) as (server, port), connect(port) as sock:
        logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn configured its loggers
        try:
            sock.sendall(post_head("/v1/completions", 100) + b'{"prompt": ')
            assert wait_for(lambda: len(server.server_state.tasks) == 1)
            start = time.monotonic()
            server.should_exit = True  # what SIGTERM sets; uvicorn's graceful timeout is grace + 5 = 5 s
            assert wait_for(lambda: not server.started or not server.server_state.connections, timeout=10)
            assert wait_for(lambda: not server.server_state.tasks, timeout=10)
            elapsed = time.monotonic() - start
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert elapsed < 3, f"shutdown waited {elapsed:.1f} s for a half-sent request"
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]


# the flags


def test_the_transport_flags_reach_the_server(model_dir, monkeypatch):
    served = []
    monkeypatch.setattr("sambay.serve.server.serve", lambda runtime, *a: served.append(a) or runtime.scheduler.close(0))
    flags = ["--max-body-mb", "2", "--max-connections", "50", "--idle-timeout", "1", "--header-timeout", "2",
             "--body-timeout", "3"]
    assert cli.main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", *flags]) == 0
    [(_, _, _, limits)] = served
    assert limits == TransportLimits(max_body_bytes=2_000_000, max_connections=50, idle_timeout=1, header_timeout=2,
                                     body_timeout=3)


def test_a_timeout_of_zero_is_a_usage_error(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(model_dir), "--header-timeout", "0"])
    assert exit_info.value.code == 2 and "--header-timeout: must be positive" in capsys.readouterr().err


def test_what_the_transport_refuses_is_counted_in_metrics(runtime):
    """413, 408, 431 and 503 never reach the app's response counter: they are counted by reason."""
    def count(reason: str) -> float:
        return runtime.metrics.registry.get_sample_value("sambay_transport_refusals_total", {"reason": reason}) or 0.0

    reasons = ("body_too_large", "body_timeout", "head_too_large", "too_many_connections")
    before = {r: count(r) for r in reasons}
    with guarded(runtime, max_body_bytes=1000, max_connections=2, **QUICK) as (server, port):
        with connect(port) as sock:
            sock.sendall(post_head("/v1/completions", 5000))
            assert read_response(sock)[0] == 413
        with connect(port) as sock:
            sock.sendall(post_head("/v1/completions", 100) + b"{")
            assert parse(read_until_closed(sock))[0] == 408
        with connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * (MAX_HEAD_BYTES + 10))
            assert parse(read_until_closed(sock))[0] == 431
        held = [connect(port) for _ in range(2)]
        assert wait_for(lambda: len(server.server_state.connections) == 2)
        with connect(port) as extra:
            assert parse(read_until_closed(extra))[0] == 503
        for sock in held:
            sock.close()
    assert {r: count(r) - before[r] for r in reasons} == dict.fromkeys(reasons, 1.0)
    assert 'sambay_transport_refusals_total{reason="too_many_connections"}' in runtime.metrics.render().decode()
