"""Response assembly from hand-made scheduler outputs: the <think> trace goes to reasoning_content, in the
whole message and in stream deltas, whatever the token boundaries; usage and finish reasons."""

from __future__ import annotations

import pytest

from sambay.generate import SequenceDelta
from sambay.generate.requests import Output
from sambay.serve.protocol import ResponseBuilder

PIECES = ["<th", "ink>", "2 + 2", " is 4", "</thi", "nk>\n\n", "The answer", " is 4."]


def outputs(pieces: list[str], samples: int = 1) -> list[Output]:
    last = len(pieces) - 1
    return [Output(tuple(SequenceDelta(j, 0, j, 100 + k, text, None, "stop" if k == last else None)
                         for j in range(samples)), finished=k == last) for k, text in enumerate(pieces)]


@pytest.fixture
def builder(engine):
    def make(chat: bool = True, n: int = 1) -> ResponseBuilder:
        return ResponseBuilder(chat=chat, model="m", n=n, prompt_tokens=5, tokenizer=engine.tokenizer)
    return make


def test_reasoning_split_in_the_message(builder):
    b = builder(n=2)
    for output in outputs(PIECES, samples=2):
        b.add(output)
    response = b.response()
    for choice in response["choices"]:
        assert choice["message"]["reasoning_content"] == "2 + 2 is 4"
        assert choice["message"]["content"] == "The answer is 4."
        assert choice["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21,
                                 "completion_tokens_details": {"reasoning_tokens": 0}}  # no delta counted any


def test_reasoning_split_in_stream_deltas(builder):
    b = builder()
    chunks = [chunk for output in outputs(PIECES) for chunk in b.add(output)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "2 + 2 is 4"
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
    assert not any("content" in d and "reasoning_content" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert b.first_chunks()[0]["choices"][0]["delta"]["role"] == "assistant"
    assert b.usage_chunk()["choices"] == [] and b.usage_chunk()["usage"]["completion_tokens"] == len(PIECES)


def test_unterminated_reasoning_and_no_reasoning(builder):
    b = builder()
    for output in outputs(["<think>", "still thinking"]):
        b.add(output)
    assert b.response()["choices"][0]["message"] == {"role": "assistant", "content": "",
                                                     "reasoning_content": "still thinking"}
    plain = builder()
    for output in outputs(["just", " text"]):
        plain.add(output)
    assert plain.response()["choices"][0]["message"]["reasoning_content"] is None


def test_completions_keep_the_raw_text(builder):
    b = builder(chat=False)
    for output in outputs(PIECES):
        b.add(output)
    assert b.response()["choices"][0]["text"] == "".join(PIECES)


@pytest.mark.parametrize("chat", [False, True])
def test_fast_stream_events_equal_json_dumps_of_the_chunks(chat):
    """`ResponseBuilder.events` (a per-request prefix + encoded text) == json.dumps of `add`'s chunks."""
    from sambay.generate import TokenLogprob
    from sambay.serve.protocol import sse_event

    class Tok:
        vocab_size = 512

        def token_bytes(self, i):
            return b"x"

    texts = ['h\u00e9"llo\n', "<think>", "a\u2028b\\", "</think>", "\x00ctl", "end \U0001f600"]
    slow = ResponseBuilder(chat=chat, model='m"x', n=2, prompt_tokens=3, tokenizer=Tok())
    fast = ResponseBuilder(chat=chat, model='m"x', n=2, prompt_tokens=3, tokenizer=Tok())
    fast.id, fast.created = slow.id, slow.created
    for k, text in enumerate(texts):
        finish = "stop" if k == len(texts) - 1 else None
        logprob = TokenLogprob(5, -0.5, ((5, -0.5),)) if k == 2 else None  # the dict path for logprob chunks
        output = Output((SequenceDelta(k % 2, 0, k % 2, 5, text, logprob, finish),), finished=finish is not None)
        assert fast.events(output) == "".join(sse_event(c) for c in slow.add(output))
    assert fast.response() == slow.response()
