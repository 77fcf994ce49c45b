"""Shared fixtures for the tokenizer tests: one tokenizer per route, built once per session.

The model directory is `tests/data/phi-4-mini-flash-reasoning` (the released `tokenizer_config.json`
and `generation_config.json`, no `tokenizer.json`), so the default route is the o200k ranks one; the
`tokenizer.json` route loads a file written into a temporary directory.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from sambay.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_json

MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "phi-4-mini-flash-reasoning"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL_DIR


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The ranks route (what the released directory gets)."""
    return load_tokenizer(MODEL_DIR, source="ranks")


@pytest.fixture(scope="session")
def json_dir(tmp_path_factory) -> Path:
    """A model directory holding the real configs plus a `tokenizer.json` written from the ranks."""
    directory = tmp_path_factory.mktemp("phi4-with-tokenizer-json")
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(MODEL_DIR / name, directory / name)
    write_tokenizer_json(MODEL_DIR, directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def json_tok(json_dir) -> Tokenizer:
    """The `tokenizer.json` route, picked automatically because the file exists."""
    return load_tokenizer(json_dir)


@pytest.fixture(scope="session")
def hf_tok(json_dir) -> HFTokenizer:
    """HF `tokenizers` running the written file with its own pipeline (markers parsed, rstrip)."""
    return HFTokenizer.from_file(str(json_dir / "tokenizer.json"))


def _mixed_text(rng: random.Random, n_chunks: int) -> str:
    words = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "was", "for", "I", "They", "HAVE"]
    samples = [
        lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(".,!? \n"),
        lambda: rng.choice(["DON'T", "I'LL", "We've", "it's", "THEY'RE", "o'clock", "'S'"]) + " ",
        lambda: str(rng.randint(0, 10**12)) + rng.choice(["", ".5", ",000", "e-9", "%"]),
        lambda: "def f(x):\n\tif x >= 10 and y != '\\n':\n        return {x: [1, 2]}  # ok\n",
        lambda: "".join(
            rng.choice("中文字符日本語のテキスト한국어텍스트") for _ in range(rng.randint(1, 40))
        ),
        lambda: rng.choice(["🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖"]) * rng.randint(1, 4),
        lambda: (
            rng.choice(["e\u0301", "n\u0303", "a\u0308\u0304", "\u0915\u094d\u0937", "\u0645\u064e"]) + "x"
        ),
        lambda: rng.choice([" ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "\u00a0", "\u3000", "\f", "\v"]),
        lambda: rng.choice(["<|end|>", "<|user|>", "<think>", "</think>", "<|endoftext|>", "<|", "|>"]),
        lambda: "".join(
            chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0xFFFD)])) for _ in range(8)
        ),
        lambda: "".join(rng.choice("!@#$%^&*()[]{}<>/\\|`~-=+_;:'\",.?") for _ in range(rng.randint(1, 9))),
    ]
    return "".join(rng.choice(samples)() for _ in range(n_chunks))


@pytest.fixture(scope="session")
def big_text() -> str:
    """About 200 KB of mixed content: prose, code, numbers, CJK, emoji, combining marks, odd whitespace."""
    text = _mixed_text(random.Random(0), 9000)
    assert 150_000 < len(text.encode("utf-8")) < 400_000
    return text
