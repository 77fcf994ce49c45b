"""Fixtures for the trainer tests: a small arithmetic chat corpus with its tokenizer, and tiny run configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sambay.train.arithmetic import make_split, render, train_tokenizer
from sambay.train.config import TrainConfig, load_train_config


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """train.jsonl (400 problems), heldout.jsonl (16) and tokenizer/ under one directory."""
    root = tmp_path_factory.mktemp("arith")
    heldout = make_split(16, seed=1)
    train = make_split(400, seed=2, exclude={e["messages"][0]["content"].replace(" ", "") for e in heldout})
    for name, examples in (("train", train), ("heldout", heldout)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    train_tokenizer((render(e["messages"]) for e in train), root / "tokenizer", vocab_size=300)
    return root


def tiny_run(corpus: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A CPU run of the tiny SambaY-DA preset on the corpus: fp32, short sequences, data shared across runs."""
    fields = dict(
        model="sambay-da-tiny", tokenizer=str(corpus / "tokenizer"), train_files=[str(corpus / "train.jsonl")],
        eval_files=[str(corpus / "heldout.jsonl")], data_dir=str(corpus / "data"), out_dir=str(out_dir),
        seq_len=32, micro_batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, schedule="constant",
        dtype="float32", device="cpu", eval_every=0, eval_batches=1, log_every=1, checkpoint_every=0,
        save_dtype="float32",
    )
    fields.update(overrides)
    return load_train_config(None, fields)
