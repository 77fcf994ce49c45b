"""The server end to end with the official `openai` client on 127.0.0.1: chat and completions, streaming
and not, n, stop, logprobs, usage, reasoning_content, 32 concurrent streams (batch-invariant greedy),
a disconnect freeing its slot, /health, /metrics, /v1/models."""

from __future__ import annotations

import concurrent.futures

import httpx

from sambay.generate import SamplingParams
from tests.serve.conftest import MODEL, wait_for

CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


def reference(engine, ids: list[int], max_tokens: int) -> str:
    """The greedy text of a prompt run alone through the plain Engine."""
    return engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=max_tokens))[0][0].text


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert "reasoning_content" in choice.message.model_dump()
    assert choice.message.content == reference(engine, engine.tokenizer.apply_chat_template(CHAT), 8)
    prompt_tokens = len(engine.tokenizer.apply_chat_template(CHAT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_tokens, 8,
                                                                                         prompt_tokens + 8)


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completion_stream_and_not(client, engine):
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert text.choices[0].text == reference(engine, engine.encode("Once upon a time"), 6)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text.choices[0].text


def test_n_samples_seeded(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=1.0, top_p=0.9, seed=3, n=3,
                  presence_penalty=0.5, frequency_penalty=0.3, extra_body={"top_k": 50, "min_p": 0.01})
    first = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2] and first.usage.completion_tokens == 18
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]


def test_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the most likely
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


def test_32_concurrent_streams_are_batch_invariant(client, engine):
    prompts = [f"Request {i}: " + "count " * (i % 9) for i in range(32)]
    alone = [reference(engine, engine.encode(p), 12) for p in prompts]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone


def test_disconnect_frees_the_slot(server, runtime):
    body = {"model": MODEL, "prompt": "Go on and on", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert runtime.scheduler.stats()["running"] == 1
        assert wait_for(lambda: runtime.scheduler.stats()["running"] == 0, timeout=10)
        assert http.get("/health").json()["free_slots"] == 8


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_prefix_cache_hits_show_in_metrics_and_keep_outputs(client, server):
    """A shared 60-word system prompt: the second request is served from the cache (counted in tokens on
    /metrics) and answers as the first did."""
    system = " ".join(f"word{i}" for i in range(60))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello there"}]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/metrics").text
        replies = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
                   for _ in range(2)]
        after = http.get("/metrics").text
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    prompt = replies[0].usage.prompt_tokens
    hits = _metric(after, "sambay_prefix_cache_hits_total") - _metric(before, "sambay_prefix_cache_hits_total")
    queries = _metric(after, "sambay_prefix_cache_queries_total") - _metric(before, "sambay_prefix_cache_queries_total")
    assert queries == 2 * prompt and hits == (prompt - 1) // 16 * 16 > 0
    assert _metric(after, "sambay_prefix_cache_snapshot_entries") > 0
    assert _metric(after, "sambay_prefix_cache_snapshot_bytes") > 0


def test_health_and_metrics(client, server):
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, temperature=0)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        text = http.get("/metrics").text
    for name in ("sambay_requests_running", "sambay_requests_waiting", "sambay_prompt_tokens_total",
                 "sambay_generation_tokens_total", "sambay_time_to_first_token_seconds_count",
                 "sambay_inter_token_latency_seconds_count", "sambay_queue_time_seconds_count",
                 'sambay_http_requests_total{path="/v1/completions",status="200"}'):
        assert name in text
