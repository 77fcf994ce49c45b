"""SIGTERM on `sambay serve` in a subprocess: new requests are refused at once; an in-flight stream either
finishes (within the grace period) or, after it, ends with an error event; the process exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import MODEL, free_port


def start(model_dir, grace: float, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "sambay.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--slots", "2", "--temperature", "0", "--shutdown-grace", str(grace), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not become ready")


def stream_through_sigterm(process: subprocess.Popen, url: str) -> tuple[list[dict], int | None]:
    """Start a long stream, SIGTERM the server after its first chunk, read the stream to its end.

    Returns the stream's events and the status of a request sent after the signal (None: refused)."""
    body = {"model": MODEL, "prompt": "tell me a long story", "max_tokens": 150, "stream": True}
    events, late_status = [], -1
    with httpx.Client(base_url=url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                events.append("[DONE]")
                break
            events.append(json.loads(line[6:]))
            if late_status == -1:
                process.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                try:
                    late_status = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"},
                                             timeout=5).status_code
                except httpx.TransportError:
                    late_status = None
    return events, late_status


@pytest.fixture(scope="module", params=["--no-engine-process", "--engine-process"])
def servers(model_dir, request):
    """Two servers started together (their start-ups overlap): grace 60 s and grace 0 s; the model in the
    server's process, then in its own."""
    started = [start(model_dir, 60, request.param), start(model_dir, 0, request.param)]
    yield started
    for process, _ in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def test_sigterm_finishes_in_flight_requests(servers):
    process, url = servers[0]
    wait_ready(process, url)
    events, late_status = stream_through_sigterm(process, url)
    assert late_status in (None, 503)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) == 151  # every token streamed
    assert process.wait(timeout=30) == 0  # a graceful shutdown exits with status 0


def test_sigterm_aborts_after_the_grace_period(servers):
    process, url = servers[1]
    wait_ready(process, url)
    events, late_status = stream_through_sigterm(process, url)
    assert late_status in (None, 503)
    assert events[-1] == "[DONE]" and "shut down" in events[-2]["error"]["message"]
    assert len(events) < 151
    assert process.wait(timeout=30) == 0  # a graceful shutdown exits with status 0
