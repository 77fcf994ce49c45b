"""Perplexity on a tiny random model equals a direct computation: one full forward when the window holds
the document, and the sliding-window rule computed token by token otherwise; batching changes nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from sambay.eval.perplexity import Window, perplexity, read_documents, score, sliding_windows
from tests.conftest import random_model, small_config


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(vocab_size=512, max_seq_len=256))


def direct_nll(model, ids: list[int], window: int, stride: int) -> float:
    """Each target t (1 <= t < len) is predicted from ids[b : t], where b is the start of the first window
    (starts 0, stride, 2 stride, ...) that reaches past t: HF's strided-perplexity rule, one token at a time."""
    total = 0.0
    for t in range(1, len(ids)):
        begin = next(b for b in range(0, len(ids), stride) if b + window > t)
        logits = model(torch.tensor([ids[begin:t]]))[0, -1]
        total += F.cross_entropy(logits.float(), torch.tensor(ids[t])).item()
    return total


def test_one_window_is_one_forward(model):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    (only,) = sliding_windows(ids, window=64, stride=32)
    assert list(only.tokens) == ids and only.scored == len(ids) - 1
    logits = model(torch.tensor([ids]))[0, :-1]
    expected = F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="sum").item()
    (result,) = score(model, [only])
    assert result.logprob == pytest.approx(-expected, rel=1e-5)
    assert result.greedy == bool((logits.argmax(-1) == torch.tensor(ids[1:])).all())


@pytest.mark.parametrize(("window", "stride"), [(16, 8), (16, 15), (10, 3)])
def test_sliding_window_equals_the_token_by_token_rule(model, window, stride):
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = list(sliding_windows(ids, window, stride))
    assert sum(w.scored for w in windows) == len(ids) - 1  # every token but the first, once
    nll = -sum(s.logprob for s in score(model, windows))
    assert nll == pytest.approx(direct_nll(model, ids, window, stride), rel=1e-5)


def test_batching_changes_nothing(model):
    g = torch.Generator().manual_seed(2)
    windows = [Window(torch.randint(0, 512, (n,), generator=g).tolist(), k) for n, k in [(30, 5), (7, 6), (19, 1),
                                                                                           (30, 29), (2, 1)]]
    alone = [score(model, [w])[0] for w in windows]
    batched = score(model, windows, batch_tokens=64)
    for a, b in zip(alone, batched, strict=True):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-4) and a.greedy == b.greedy


def test_perplexity_and_bits_per_byte(model, tokenizer, tmp_path):
    docs = ["What is 12+7?\n19", "Calculate 300 - 5.\n295 é"]
    window, stride = 12, 6
    nll, tokens = 0.0, 0
    for text in docs:
        ids = [tokenizer.eos_token_id, *tokenizer.encode(text)]
        nll += direct_nll(model, ids, window, stride)
        tokens += len(ids) - 1
    result = perplexity(model, tokenizer, [*docs, ""], window=window, stride=stride)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert result["tokens"] == tokens and result["bytes"] == nbytes and result["documents"] == 2
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["a b", "c"]))
    assert read_documents(jsonl) == ["a b", "c"]


def test_bad_windows_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="stride < window"):
        list(sliding_windows([1, 2, 3], window=4, stride=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        perplexity(model, tokenizer, ["x"], window=10_000)
