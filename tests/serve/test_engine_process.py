"""The scheduler in its own process (`RemoteScheduler`): the same outputs, errors, cancellation and
shutdown as in-process, through a pipe."""

from __future__ import annotations

import queue

import pytest

from sambay.generate.requests import PromptTooLong, SchedulerClosed, SchedulerConfig
from sambay.serve.engine_process import EngineSpec, RemoteScheduler
from tests.serve.conftest import GREEDY


@pytest.fixture(scope="module")
def remote(model_dir):
    spec = EngineSpec(model_dir=str(model_dir), tokenizer_dir=str(model_dir), device="cpu", dtype=None,
                      scheduler=SchedulerConfig(slots=4, max_length=256, block_size=16, max_waiting=8))
    scheduler = RemoteScheduler(spec)
    yield scheduler
    scheduler.close(0)


@pytest.mark.slow
def test_outputs_equal_the_in_process_engine(remote, engine):
    prompts = [[5, 6, 7], list(range(10, 40)), [99] * 12]
    outputs = [queue.Queue() for _ in prompts]
    for prompt, sink in zip(prompts, outputs, strict=True):  # in flight together
        remote.submit(prompt, GREEDY, sink.put)
    for prompt, sink in zip(prompts, outputs, strict=True):
        tokens, last = [], None
        while last is None or not last.finished:
            last = sink.get(timeout=60)
            tokens += [d.token_id for d in last.deltas]
        assert last.error is None
        assert tokens == engine.generate([prompt], GREEDY)[0][0].token_ids
    assert remote.stats()["running"] == 0 and remote.memory.slots == 4


@pytest.mark.slow
def test_bad_requests_fail_at_submit_with_the_scheduler_errors(remote):
    with pytest.raises(PromptTooLong):
        remote.submit([1] * 256, GREEDY, lambda o: None)
    with pytest.raises(ValueError, match="token id"):
        remote.submit([], GREEDY, lambda o: None)
    with pytest.raises(ValueError, match="slots"):
        remote.submit([1], GREEDY.replace(n=5), lambda o: None)


@pytest.mark.slow
def test_cancel_ends_the_request(remote):
    outputs = queue.Queue()
    request = remote.submit([3, 4, 5], GREEDY.replace(max_new_tokens=200), outputs.put)
    first = outputs.get(timeout=60)
    request.cancel()
    last = first
    while not last.finished:
        last = outputs.get(timeout=60)
    assert last.error is None and remote.stats()["running"] == 0


@pytest.mark.slow
def test_close_finishes_then_refuses(model_dir):
    spec = EngineSpec(model_dir=str(model_dir), tokenizer_dir=str(model_dir), device="cpu", dtype=None,
                      scheduler=SchedulerConfig(slots=2, max_length=128, block_size=16))
    scheduler = RemoteScheduler(spec)
    outputs = queue.Queue()
    scheduler.submit([7, 8], GREEDY, outputs.put)
    scheduler.close(grace=30)
    seen = []
    while not outputs.empty():
        seen.append(outputs.get())
    assert seen[-1].finished and seen[-1].error is None and sum(len(o.deltas) for o in seen) == 16
    with pytest.raises(SchedulerClosed):
        scheduler.submit([1], GREEDY, outputs.put)


@pytest.mark.slow
def test_cli_serve_with_the_engine_process(model_dir, engine):
    """`sambay serve --engine-process`: streamed and whole completions equal the engine's; SIGTERM drains."""
    import signal

    import openai

    from tests.serve.conftest import MODEL
    from tests.serve.test_shutdown import start, wait_ready

    process, url = start(model_dir, 10, "--engine-process")
    try:
        wait_ready(process, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        prompt = "tell me a story"
        expected = engine.generate([prompt], GREEDY)[0][0].text
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True) if c.choices)
        assert whole.choices[0].text == streamed == expected
        assert whole.usage.completion_tokens == 16
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "model in its own process" in output
