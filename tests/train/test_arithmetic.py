"""The arithmetic demo: every generated answer and worked step is right; the tokenizer loads like the release's."""

from __future__ import annotations

import random
import re

import pytest
import torch

from sambay.tokenizer import load_tokenizer
from sambay.train.arithmetic import make_split, worked_solution
from sambay.train.evaluate import exact_match, greedy_generate
from tests.conftest import random_model, small_config

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def test_answers_are_correct():
    for example in make_split(3000, seed=7):
        question, reply = (m["content"] for m in example["messages"])
        a, op, b = re.search(r"(\d+) ?([-+*]) ?(\d+)", question).groups()
        expected = _OPS[op](int(a), int(b))
        assert example["answer"] == str(expected)
        assert reply.endswith(f"</think>\n{expected}") and f"so {a}{op}{b}={expected}\n" in reply


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_every_worked_step_is_arithmetic(op):
    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        reasoning, result = worked_solution(a, op, b)
        assert result == _OPS[op](a, b)
        for lhs, rhs in re.findall(r"(?<![\d*])(-?\d+(?:[-+*]\d+)+)=(-?\d+)", reasoning):
            assert eval(lhs) == int(rhs), (lhs, rhs)  # the steps use only digits and + - *


def test_splits_are_fixed_and_disjoint():
    heldout = make_split(200, seed=1)
    assert heldout == make_split(200, seed=1)
    questions = {e["messages"][0]["content"].replace(" ", "") for e in heldout}
    train = make_split(2000, seed=2, exclude=questions)
    assert not questions & {e["messages"][0]["content"].replace(" ", "") for e in train}


def test_tokenizer_has_release_markers_and_single_digits(corpus):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    assert tokenizer.vocab_size <= 512
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 308+94?"}])
    assert tokenizer.decode(ids) == "<|user|>What is 308+94?<|end|><|assistant|>"
    assert [tokenizer.decode([i]) for i in tokenizer.encode("30894")] == list("30894")
    assert tokenizer.stop_token_ids() == [tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<|endoftext|>")]


def test_greedy_generation_matches_uncached_argmax():
    model = random_model(small_config(vocab_size=64), seed=1)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    out = greedy_generate(model, prompts, max_new_tokens=6, stop_ids=[63])
    for prompt, generated in zip(prompts, out, strict=True):
        ids = list(prompt)
        for token in generated:
            with torch.no_grad():
                assert int(model(torch.tensor([ids]))[0, -1].argmax()) == token
            ids.append(token)


def test_exact_match_scores_answers(corpus):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    model = random_model(small_config(vocab_size=320), seed=0)
    examples = make_split(3, seed=5)
    tasks = {e["task"] for e in examples}
    expected = {"accuracy": 0.0, "n": 3} | {f"accuracy/{t}": 0.0 for t in tasks}
    expected |= {f"n/{t}": sum(e["task"] == t for e in examples) for t in tasks}
    assert exact_match(model, tokenizer, examples, max_new_tokens=4) == expected
    untagged = [{k: v for k, v in e.items() if k != "task"} for e in examples]
    assert exact_match(model, tokenizer, untagged, max_new_tokens=4) == {"accuracy": 0.0, "n": 3}
