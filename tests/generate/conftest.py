"""Fixtures for the generation tests: a tiny random model, a byte-table tokenizer, a scripted model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sambay.text.detokenizer import IncrementalDetokenizer
from tests.conftest import random_model, small_config


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (`tests.conftest.one_thread`)."""
    yield


@pytest.fixture(scope="module")
def model():
    """A tiny random SambaY (vocab 97) whose every path changes the logits."""
    return random_model(small_config())


class TableTokenizer:
    """The part of `Tokenizer` the Engine uses, over a table id → bytes (ids not in it decode to nothing)."""

    def __init__(self, table: dict[int, bytes], vocab_size: int = 97, stop_ids: tuple[int, ...] = ()):
        self.table, self.vocab_size, self.stop_ids = table, vocab_size, stop_ids

    def detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(lambda i: self.table.get(i, b""))

    def stop_token_ids(self) -> list[int]:
        return list(self.stop_ids)

    def decode(self, ids) -> str:
        return b"".join(self.table.get(i, b"") for i in ids).decode("utf-8", errors="replace")


def letters_tokenizer(vocab_size: int = 97) -> TableTokenizer:
    """Token i is the two-letter string 'ab', 'bc', ... (every id decodes to text)."""
    return TableTokenizer({i: bytes([97 + i % 26, 97 + (i + 1) % 26]) for i in range(vocab_size)}, vocab_size)


class ScriptedModel(nn.Module):
    """Runs a real model (so the cache is exercised) but makes token ``script[k]`` the only choice at step k.

    Step k is read from the cache and this call's tokens: after the prefill a row holds ``prompt_len``
    tokens, after k decode steps ``prompt_len + k``.
    """

    def __init__(self, inner: nn.Module, script: list[int], prompt_len: int):
        super().__init__()
        self.inner, self.script, self.prompt_len = inner, script, prompt_len
        self.config = inner.config

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def new_cache(self, **kwargs):
        return self.inner.new_cache(**kwargs)

    def forward(self, tokens: Tensor, cache=None, **kwargs) -> Tensor:
        logits = self.inner(tokens, cache, **kwargs)
        lengths = kwargs.get("lengths")
        end = cache.seqlens + (tokens.shape[1] if lengths is None else lengths)  # (b,) after this call
        steps = (end - self.prompt_len).clamp(max=len(self.script) - 1)  # (b,)
        scripted = torch.full_like(logits, -1e4)
        scripted[torch.arange(logits.shape[0]), -1, torch.tensor(self.script)[steps]] = 0.0
        return scripted
