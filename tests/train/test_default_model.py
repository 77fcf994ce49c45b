"""The embedded default model (`sambay.default_model`): it loads like a release, answers held-out
arithmetic correctly with greedy decoding on the CPU, and is what the CLI uses without ``--model``.

The held-out problems are the first ones of ``make_split(500, seed=1)``, the split the model was scored
on after training (never in its training data). Measured there: 98.8% greedy exact match on 500 (+ 100%,
- 97.0%, * 99.4%), so 9 of 10 leaves room for rounding differences between the GPU and the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sambay.checkpoint import load_model
from sambay.default_model import default_model_dir
from sambay.tokenizer import load_tokenizer
from sambay.train.arithmetic import make_split
from sambay.train.evaluate import exact_match

MAX_REPLY_TOKENS = 110  # the test's problems: short worked solutions, so greedy decoding stays quick on a CPU


@pytest.fixture(scope="module")
def model_and_tokenizer():
    directory = default_model_dir()
    return load_model(directory, dtype=torch.float32, progress=False).eval(), load_tokenizer(directory)


def held_out_problems(tokenizer, per_task: dict[str, int]) -> list[dict]:
    """The first held-out problems of each operator whose reference reply is short."""
    chosen, left = [], dict(per_task)
    for example in make_split(500, seed=1):
        short = len(tokenizer.encode(example["messages"][-1]["content"])) <= MAX_REPLY_TOKENS
        if short and left.get(example["task"], 0) > 0:
            chosen.append(example)
            left[example["task"]] -= 1
    return chosen


def test_default_model_is_a_small_model_directory():
    directory = default_model_dir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (directory / name).is_file(), name
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert 0 < weights <= 15e6


def test_default_model_answers_held_out_problems(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    examples = held_out_problems(tokenizer, {"+": 4, "-": 3, "*": 3})
    assert len(examples) == 10
    result = exact_match(model, tokenizer, examples, max_new_tokens=MAX_REPLY_TOKENS + 8)  # ~7 s on 2 cores
    assert result["accuracy"] >= 0.9, result


def test_cli_uses_the_default_model():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "sambay.cli", "generate", "--seed", "0", "What is 308+94?"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].strip() == "402", result.stdout
