"""Reasoning budgets on the embedded model, and the think-block tracker they rest on.

The embedded model answers "What is 308+94?" with ``<think>\\n`` worked steps ``</think>\\n402``: a budget of
3 closes the block after three tokens and the model still answers; a budget of 0 writes an empty block;
``reasoning_tokens`` counts the tokens between the tags; a budget the model stays under changes nothing;
budgeted rows give the same tokens under asynchronous and synchronous scheduling.
"""

from __future__ import annotations

import random

import pytest

from sambay.default_model import default_model_dir
from sambay.generate import Engine, SamplingParams
from sambay.generate.constraints import CLOSE_TEXT, OPEN_TEXT, Guide, Phase, ThinkTracker
from sambay.generate.core import EngineCore
from sambay.generate.requests import SchedulerConfig
from sambay.text.reasoning import ReasoningParser, split_reasoning


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(default_model_dir(), progress=False)


def chat(engine: Engine, question: str = "What is 308+94?") -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def greedy(**fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_new_tokens": 160, "reasoning": True, **fields})


def test_a_budget_of_three_closes_the_reasoning_and_the_model_still_answers(engine):
    encode = engine.tokenizer.encode
    c = engine.generate([chat(engine)], greedy(max_reasoning_tokens=3))[0][0]
    opener, close = encode(OPEN_TEXT), encode(CLOSE_TEXT)
    assert c.token_ids[: len(opener)] == opener
    assert c.token_ids[len(opener) + 3 : len(opener) + 3 + len(close)] == close  # forced right after 3 tokens
    assert c.reasoning_tokens == 3
    split = split_reasoning(c.text)
    assert split.reasoning == "\n" + engine.tokenizer.decode(c.token_ids[len(opener) : len(opener) + 3])
    assert c.finish_reason == "stop" and split.content.strip().isdigit()  # an answer, then <|end|>


def test_a_budget_of_zero_skips_the_reasoning(engine):
    c = engine.generate([chat(engine)], greedy(max_reasoning_tokens=0))[0][0]
    assert c.text.startswith("<think>\n</think>\n") and c.reasoning_tokens == 0
    split = split_reasoning(c.text)
    assert split.reasoning.strip() == "" and split.content.strip().isdigit() and c.finish_reason == "stop"


def test_reasoning_tokens_count_the_tokens_between_the_tags(engine):
    free = engine.generate([chat(engine)], greedy())[0][0]
    opener, close = engine.tokenizer.encode(OPEN_TEXT), engine.tokenizer.encode(CLOSE_TEXT)
    ids = free.token_ids
    at = next(i for i in range(len(ids)) if ids[i : i + len(close)] == close)
    assert ids[: len(opener)] == opener and free.reasoning_tokens == at - len(opener) > 20
    roomy = engine.generate([chat(engine)], greedy(max_reasoning_tokens=free.reasoning_tokens))[0][0]
    assert roomy.token_ids == ids and roomy.reasoning_tokens == free.reasoning_tokens  # a budget not hit: no change
    plain = engine.generate([chat(engine)], SamplingParams(temperature=0, max_new_tokens=160))[0][0]
    assert plain.token_ids == ids and plain.reasoning_tokens == 0  # not a reasoning request: not counted


def test_the_budget_counts_from_a_prompt_that_opened_the_block(engine):
    prompt = chat(engine) + engine.tokenizer.encode(OPEN_TEXT)
    c = engine.generate([prompt], greedy(max_reasoning_tokens=4))[0][0]
    close = engine.tokenizer.encode(CLOSE_TEXT)
    assert c.token_ids[4 : 4 + len(close)] == close and c.reasoning_tokens == 4 and c.finish_reason == "stop"


def run_core(engine: Engine, requests: list[tuple[list[int], SamplingParams]], overlap: bool, slots: int = 6
             ) -> list[tuple[list[int], int | None]]:
    """Every request submitted at once to a fresh core stepped (asynchronously with ``overlap``) to the end:
    per request, its tokens and the reasoning tokens of its last delta."""
    core = EngineCore(engine, SchedulerConfig(slots=slots, max_length=256, prefill_chunk=16, prefill_budget=32))
    outputs: list[list] = [[] for _ in requests]
    finished: list[bool] = [False] * len(requests)

    def sink(i: int):
        def put(output) -> None:
            outputs[i].extend(output.deltas)
            finished[i] = output.finished
        return put

    for i, (prompt, params) in enumerate(requests):
        core.submit(prompt, params, sink(i))
    for _ in range(2000):
        if all(finished):
            break
        core.step(overlap)
    assert all(finished)
    return [([d.token_id for d in ds], ds[-1].reasoning_tokens) for ds in outputs]


def test_budgets_are_the_same_asynchronous_and_synchronous(engine):
    questions = ["What is 308+94?", "What is 127*46?", "What is 95-38?", "What is 7*8?"]
    requests = [(chat(engine, q), greedy(max_reasoning_tokens=b, max_new_tokens=96))
                for q in questions for b in (None, 0, 2, 9)]
    together = run_core(engine, requests, overlap=True)
    assert together == run_core(engine, requests, overlap=False)
    for (_, params), (_, reasoning) in zip(requests, together, strict=True):
        assert params.max_reasoning_tokens is None or reasoning <= params.max_reasoning_tokens


def test_sampling_params_check_the_budget():
    with pytest.raises(ValueError, match="reasoning=True"):
        SamplingParams(max_reasoning_tokens=10)
    with pytest.raises(ValueError, match="max_reasoning_tokens"):
        SamplingParams(reasoning=True, max_reasoning_tokens=-1)


# the tracker ------------------------------------------------------------------------------------------


def feed_all(tracker: ThinkTracker, pieces: list[bytes]) -> list[bytes | None]:
    return [tracker.feed(p) for p in pieces]


def test_the_tracker_counts_tokens_that_start_inside_the_block():
    t = ThinkTracker()
    rests = feed_all(t, [b"hi <th", b"ink", b">\n", b"a", b"b</", b"think", b">\nans"])
    assert t.phase is Phase.ANSWER and rests[-1] == b"\nans" and rests[:-1] == [None] * 6
    assert t.reasoning == 2  # "a" and "b</" (it starts with reasoning text); the close's tokens are not counted


def test_a_false_close_is_reasoning_and_a_held_close_is_tentative():
    t = ThinkTracker()
    feed_all(t, [b"<think>", b"x", b"</", b"thin"])
    assert (t.phase, t.reasoning, t.tentative, t.held) == (Phase.THINKING, 1, 3, b"</thin")
    t.feed(b"g about it")
    assert (t.phase, t.reasoning, t.tentative, t.held) == (Phase.THINKING, 4, 4, b"")


@pytest.mark.parametrize("seed", range(5))
def test_the_tracker_follows_the_reasoning_parser_over_any_split(seed):
    rng = random.Random(seed)
    text = "pre <thi <think>\nstep </thin> one </ think\n</think>\n\nanswer </think> <think>"
    data = text.encode()
    cuts = sorted(rng.sample(range(1, len(data)), 12))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    tracker, parser = ThinkTracker(), ReasoningParser()
    for piece in pieces:
        tracker.feed(piece)
        parser.feed(piece.decode())
        assert (tracker.phase is Phase.THINKING) == parser.in_reasoning
    assert tracker.phase is Phase.ANSWER


def test_a_budget_row_needs_exact_state_only_near_its_budget(engine):
    tok = engine.tokenizer
    guide = Guide(token_bytes=tok.token_bytes, encode=tok.encode, reasoning=True, budget=5)
    guide.begin(b"")
    assert guide.may_need_mask() and guide.next().token == tok.encode(OPEN_TEXT)[0]  # the opener is forced
    for token in tok.encode(OPEN_TEXT):
        guide.accept(token)
    steps = []
    for token in tok.encode("12345"):  # five digit tokens
        steps.append((guide.may_need_mask(), guide.next()))
        guide.accept(token)
    # before the 5th token the 5th may reach the budget: from then on the step needs the exact state
    assert steps == [(False, None)] * 4 + [(True, None)]
    assert guide.next().token == tok.encode(CLOSE_TEXT)[0]
    assert list(guide.forced) == tok.encode(CLOSE_TEXT)
