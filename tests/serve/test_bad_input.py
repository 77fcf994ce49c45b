"""Bad input never crashes the server: each case gets OpenAI's error format and the right status, and the
server keeps answering. Also: the API key, and the queue limit (429) and shutdown (503) answers."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from sambay.generate.core import EngineCore
from sambay.generate.requests import SchedulerConfig
from sambay.serve.app import create_app
from sambay.serve.runtime import Runtime
from tests.serve.conftest import GREEDY, MODEL

OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

CASES = [  # (route, body (dict, or raw bytes), status, param)
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, {**OK_CHAT, "model": "gpt-4"}, 404, "model"),
    (CHAT, {**OK_CHAT, "messages": []}, 422, "messages"),
    (CHAT, {"model": MODEL}, 422, "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    (CHAT, {**OK_CHAT, "messages": "hi"}, 422, "messages"),
    (CHAT, {**OK_CHAT, "temperature": "hot"}, 422, "temperature"),
    (CHAT, {**OK_CHAT, "temperature": -1}, 422, "temperature"),
    (CHAT, {**OK_CHAT, "top_p": 0}, 422, "top_p"),
    (CHAT, {**OK_CHAT, "max_tokens": 0}, 422, "max_tokens"),
    (CHAT, {**OK_CHAT, "n": 1000}, 422, "n"),
    (CHAT, {**OK_CHAT, "presence_penalty": 3}, 422, "presence_penalty"),
    (CHAT, {**OK_CHAT, "top_logprobs": 50, "logprobs": True}, 422, "top_logprobs"),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {**OK_CHAT, "stop": [""]}, 422, "stop"),
    (CHAT, {**OK_CHAT, "max_tokens": 100000}, 400, "max_tokens"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 600}]}, 413, "messages"),
    (COMPLETIONS, {"model": MODEL, "prompt": ""}, 422, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [1, -5]}, 400, "prompt"),
    (COMPLETIONS, {"model": MODEL, "prompt": [7] * 600}, 413, "messages"),
    (COMPLETIONS, {"model": MODEL, "prompt": "hi", "echo": True}, 422, "echo"),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), CASES)
def test_bad_input_gets_an_openai_error(server, route, body, status, param):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        if isinstance(body, bytes):
            r = http.post(route, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(route, json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param
        assert http.post(CHAT, json=OK_CHAT).status_code == 200  # still serving


@pytest.fixture
def parked(engine):
    """An app whose scheduler is never started: requests stay queued (1 slot, 2 waiting)."""
    scheduler = EngineCore(engine, SchedulerConfig(slots=1, max_waiting=2, max_length=64))
    runtime = Runtime(engine.tokenizer, scheduler, MODEL, GREEDY, api_key="sekret")
    with TestClient(create_app(runtime), base_url="http://127.0.0.1") as client:
        yield scheduler, client


def test_api_key(parked):
    _, client = parked
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] == 64
    assert client.get("/health").status_code == 200


def test_full_queue_gets_429_and_shutdown_503(parked):
    scheduler, client = parked
    auth = {"Authorization": "Bearer sekret"}
    for _ in range(2):
        scheduler.submit([1, 2, 3], GREEDY, lambda output: None)
    r = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi"}, headers=auth)
    assert r.status_code == 429 and "overloaded" in r.json()["error"]["message"] and r.headers["retry-after"]
    scheduler.close(0)
    r = client.post(COMPLETIONS, json={"model": MODEL, "prompt": "hi"}, headers=auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert client.get("/health").status_code == 503
