"""What a client may send: a JSON body under any Content-Type (as OpenAI's and vLLM's servers accept, since
``curl -d`` sends form-urlencoded), and no ``model`` (the one served); anything not JSON is refused clearly."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain",
                                          "application/json; charset=utf-8"])
@pytest.mark.parametrize(("route", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_json_body_is_accepted_whatever_the_content_type(http, route, body, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = http.post(route, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(("route", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_model_may_be_omitted(http, route, body):
    unnamed = {k: v for k, v in body.items() if k != "model"}
    r = http.post(route, json=unnamed)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL
    with http.stream("POST", route, json={**unnamed, "stream": True}) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["model"] == MODEL


@pytest.mark.parametrize(("content", "content_type", "message"), [
    (b"model=tiny-phi4&prompt=hi", "application/x-www-form-urlencoded", "it is not valid JSON"),
    (b"hello", "text/plain", "it is not valid JSON"),
    (b"", "application/json", "it is not valid JSON"),
    (b"\xff\xfe{", "application/json", "it is not valid JSON"),
    (b'["hi"]', "application/json", "must be a JSON object, got an array"),
    (b'"hi"', "text/plain", "must be a JSON object, got a string"),
])
def test_a_body_that_is_not_a_json_object_is_refused_clearly(http, content, content_type, message):
    r = http.post("/v1/completions", content=content, headers={"content-type": content_type})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == "invalid_json"


def test_field_errors_still_name_the_field_under_any_content_type(http):
    r = http.post("/v1/completions", content=json.dumps({**COMPLETION, "temperature": "hot"}),
                  headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
