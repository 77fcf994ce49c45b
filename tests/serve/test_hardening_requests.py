"""Hostile requests (issue 13): a non-streaming client that goes away frees its slot at once; the sampling
parameters' numeric domain and no NaN or Infinity in any JSON sent; prompts refused by length before
tokenizing; lone surrogates in any text field refused; /metrics labelled by route; the Bearer scheme."""

from __future__ import annotations

import json
import math
import time
import uuid

import httpx
import pytest
from starlette.testclient import TestClient

from sambay.generate import SamplingParams, SequenceDelta, TokenLogprob
from sambay.generate.core import EngineCore
from sambay.generate.requests import Output, SchedulerConfig
from sambay.serve.app import create_app
from sambay.serve.protocol import ResponseBuilder
from sambay.serve.runtime import Runtime
from tests.serve.conftest import GREEDY, MODEL, LiveServer, free_port, wait_for

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def strict_json(text: str):
    """``json.loads`` refusing NaN and Infinity, which are not JSON (RFC 8259) and break other parsers."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


# ---- a non-streaming client that disconnects -----------------------------------------------------------


@pytest.fixture
def slow_server(engine):
    """A server whose steps take 50 ms and whose requests never stop early (no stop ids): a 480-token
    generation takes 24 s, while tokens keep arriving far more often than the disconnect poll."""
    core = EngineCore(engine, SchedulerConfig(slots=2, max_length=512), on_step=lambda: time.sleep(0.05)).start()
    runtime = Runtime(engine.tokenizer, core, MODEL, SamplingParams(temperature=0, stop_token_ids=()))
    with LiveServer(create_app(runtime), free_port()) as live:
        yield live, core
    core.close(0)


def test_a_non_streaming_client_that_disconnects_frees_its_slot(slow_server):
    live, core = slow_server
    with httpx.Client(base_url=live.url, timeout=2) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 480})
        assert core.stats()["running"] == 1  # still generating: the client has not closed the connection yet
    assert wait_for(lambda: core.stats()["running"] == 0, timeout=5), core.stats()


# ---- numeric domain ------------------------------------------------------------------------------------


def test_a_tiny_temperature_is_greedy_with_finite_logprobs(http):
    body = {"prompt": "hello there", "max_tokens": 6, "logprobs": 3}
    greedy = http.post(COMPLETIONS, json={**body, "temperature": 0})
    tiny = http.post(COMPLETIONS, json={**body, "temperature": 1e-45})
    assert tiny.status_code == 200, tiny.text
    assert strict_json(tiny.text)["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert all(math.isfinite(lp) for lp in tiny.json()["choices"][0]["logprobs"]["token_logprobs"])


def test_streamed_logprobs_are_strict_json(http):
    body = {"prompt": "hello", "max_tokens": 6, "logprobs": 2, "temperature": 1e-45, "top_k": 2, "stream": True}
    with http.stream("POST", COMPLETIONS, json=body) as stream:
        lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and len(lines) > 2
    for line in lines[:-1]:
        strict_json(line)


@pytest.mark.parametrize(("route", "field", "value"), [
    (COMPLETIONS, "repetition_penalty", 1e-300),
    (COMPLETIONS, "repetition_penalty", 11),
    (CHAT, "repetition_penalty", 0.001),
    (COMPLETIONS, "temperature", 1e300),
])
def test_out_of_range_sampling_values_name_the_field(http, route, field, value):
    body = {"prompt": "hi"} if route == COMPLETIONS else {"messages": [{"role": "user", "content": "hi"}]}
    r = http.post(route, json={**body, "max_tokens": 2, field: value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_the_body_are_refused(http, literal):
    r = http.post(COMPLETIONS, content=f'{{"prompt": "hi", "max_tokens": 2, "temperature": {literal}}}')
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_logprobs_never_reach_the_wire(engine, chat, bad):
    """Whatever the model thread hands over, a response and its stream chunks hold only finite numbers: a
    logprob that is NaN or -inf becomes -9999.0 (vLLM's floor for -inf), a positive infinity 0."""
    def make() -> ResponseBuilder:
        return ResponseBuilder(chat=chat, model="m", n=1, prompt_tokens=3, tokenizer=engine.tokenizer)
    logprob = TokenLogprob(100, bad, ((100, bad), (101, -1.5)))
    output = Output((SequenceDelta(0, 0, 0, 100, "x", logprob, "stop"),), finished=True)
    whole = make()
    whole.add(output)
    events = make().events(output)
    expected = 0.0 if bad == float("inf") else -9999.0
    for data in [strict_json(json.dumps(whole.response())), *(strict_json(e[6:]) for e in events.split("\n\n") if e)]:
        logprobs = data["choices"][0]["logprobs"]
        first = logprobs["content"][0] if chat else {"logprob": logprobs["token_logprobs"][0]}
        assert first["logprob"] == expected


def test_json_text_never_writes_nan_or_infinity():
    from sambay.serve.protocol import json_text

    data = {"a": [float("nan"), float("inf"), float("-inf"), 1.5], "b": {"c": float("nan")}, "t": "é"}
    assert strict_json(json_text(data)) == {"a": [-9999.0, 0.0, -9999.0, 1.5], "b": {"c": -9999.0}, "t": "é"}


# ---- prompts too long to tokenize ----------------------------------------------------------------------


def longest_token(tokenizer) -> int:
    return max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))


def test_a_prompt_longer_than_any_context_is_refused_without_tokenizing(http, runtime, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("tokenized a prompt whose length alone rules it out")
    monkeypatch.setattr(runtime.tokenizer, "encode", never)
    monkeypatch.setattr(runtime.tokenizer, "apply_chat_template", never)
    text = "a" * ((runtime.max_length - 1) * longest_token(runtime.tokenizer) + 1)
    for route, body in [(COMPLETIONS, {"prompt": text}),
                        (CHAT, {"messages": [{"role": "user", "content": text[:100]}] * 2
                                + [{"role": "user", "content": [{"type": "text", "text": text[200:]}]}]})]:
        r = http.post(route, json=body)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"


def test_a_prompt_that_may_fit_goes_on_to_the_tokenizer(http, runtime, monkeypatch):
    """At ``(max_length - 1) * longest token`` characters the prompt may still fit (every token as long as
    the longest), so the tokenizer decides: here a stand-in that finds 3 tokens."""
    calls = []
    monkeypatch.setattr(runtime.tokenizer, "encode", lambda text, **kw: calls.append(len(text)) or [9, 9, 9])
    text = " " * ((runtime.max_length - 1) * longest_token(runtime.tokenizer))
    r = http.post(COMPLETIONS, json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert calls == [len(text)]


# ---- lone surrogates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "body", "param"), [
    (COMPLETIONS, {"prompt": "a\ud800b"}, "prompt"),
    (COMPLETIONS, {"prompt": ["\udfff"]}, "prompt.0"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["ok", "\ud83d"]}, "stop.1"),
    (COMPLETIONS, {"prompt": "hi", "stop": "\ud800"}, "stop"),
    (COMPLETIONS, {"prompt": "hi", "model": "\ud800"}, "model"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00"}]}]},
     "messages.0.content.0.text"),
])
def test_lone_surrogates_are_refused_with_400(http, route, body, param):
    r = http.post(route, content=json.dumps(body))  # ensure_ascii: the surrogate travels as a \\ud800 escape
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_unicode" and "surrogate" in error["message"]


def test_utf8_encoded_surrogates_are_refused_with_400(http):
    r = http.post(COMPLETIONS, content=b'{"prompt": "\xed\xa0\x80"}')  # json.loads reads these bytes as U+D800
    assert r.status_code == 400, r.text


def test_a_surrogate_pair_is_ordinary_text(http):
    r = http.post(COMPLETIONS, content=json.dumps({"prompt": "\U0001f600", "max_tokens": 2}))  # \\ud83d\\ude00
    assert r.status_code == 200, r.text


# ---- /metrics ------------------------------------------------------------------------------------------


def test_metrics_label_requests_by_route_not_by_raw_path(http):
    paths = [f"/nowhere/{uuid.uuid4().hex}" for _ in range(40)]
    for path in paths:
        assert http.get(path).status_code == 404
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("sambay_http_requests_total{")]
    assert not any("/nowhere/" in line for line in lines)
    labels = {line.split('path="')[1].split('"')[0] for line in lines}
    assert labels <= {"/health", "/metrics", "/v1/models", CHAT, COMPLETIONS, "unmatched"}
    unmatched = [line for line in lines if 'path="unmatched"' in line and 'status="404"' in line]
    assert unmatched and float(unmatched[0].split()[-1]) >= len(paths)


# ---- the Bearer scheme ---------------------------------------------------------------------------------


@pytest.fixture
def keyed(engine):
    """An app with an API key (its scheduler never started: only authentication is exercised)."""
    scheduler = EngineCore(engine, SchedulerConfig(slots=1, max_waiting=2, max_length=64))
    runtime = Runtime(engine.tokenizer, scheduler, MODEL, GREEDY, api_key="sekret")
    with TestClient(create_app(runtime), base_url="http://127.0.0.1") as client:
        yield client


@pytest.mark.parametrize("header", ["bearer sekret", "BEARER sekret", "Bearer  sekret", "Bearer sekret "])
def test_the_auth_scheme_is_case_insensitive(keyed, header):
    assert keyed.get("/v1/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic sekret", "sekret", "Bearersekret", "Bearer"])
def test_a_refused_key_gets_401_with_www_authenticate(keyed, header):
    r = keyed.get("/v1/models", headers={} if header is None else {"Authorization": header})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
