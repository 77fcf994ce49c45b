"""Fixtures of the CLI tests: a tiny random model with the release's tokenizer, and how to run `sambay`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sambay
from sambay.generate import Engine
from sambay.tokenizer import write_tokenizer_json
from tests.conftest import RELEASED_CONFIG_DIR, random_model, small_config


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random model with the release's vocabulary size (tiny width), and the release's tokenizer files."""
    directory = tmp_path_factory.mktemp("tiny-phi4")
    config = small_config(vocab_size=200064, d_model=16, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=256)
    sambay.save_model(random_model(config), directory)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(RELEASED_CONFIG_DIR / name, directory / name)
    write_tokenizer_json(directory)  # loads in ~3 s, against ~8 s for the o200k ranks route
    return directory


@pytest.fixture(scope="session")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir, progress=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    """In-process `generate` / `chat` set torch's thread count: give the next test the one it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m sambay.cli ARGS` with ``stdin``; stdout and stderr captured as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sambay.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
