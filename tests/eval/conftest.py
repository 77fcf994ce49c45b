"""Fixtures of the evaluation tests: the embedded arithmetic model, its tokenizer, held-out problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sambay.default_model import default_model_dir
from sambay.generate import Engine
from sambay.tokenizer import Tokenizer, load_tokenizer
from sambay.train.arithmetic import make_split


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_dir())


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The embedded default model in float32 on the CPU (what `sambay eval` runs without --model)."""
    return Engine.load(default_model_dir(), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (`tests.conftest.one_thread`)."""
    yield


def held_out_math(tokenizer: Tokenizer, count: int, max_reply_tokens: int = 60) -> list[dict]:
    """The first held-out problems (``make_split(500, seed=1)``, never trained on) with short worked replies,
    in the public math format: ``{"problem", "answer"}``."""
    chosen = []
    for example in make_split(500, seed=1):
        if len(tokenizer.encode(example["messages"][-1]["content"])) <= max_reply_tokens:
            chosen.append({"problem": example["messages"][0]["content"], "answer": example["answer"]})
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough short held-out problems")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
