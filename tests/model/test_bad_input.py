"""Bad calls to the model and its cache give clear errors, never a crash deep inside a layer."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import forward, random_model, small_config


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())


def test_writing_past_max_length_is_an_error_and_changes_nothing(model):
    cache = model.new_cache(batch_size=1, max_length=8)
    forward(model, torch.zeros(1, 6, dtype=torch.long), cache)
    before = [t.clone() for t in cache.tensors()]
    with pytest.raises(ValueError, match=r"cache overflow.*max_length is 8"):
        forward(model, torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.seqlens.tolist() == [6]
    assert all(torch.equal(a, b) for a, b in zip(before, cache.tensors(), strict=True))
    forward(model, torch.zeros(1, 2, dtype=torch.long), cache)  # exactly full is fine
    assert cache.seqlens.tolist() == [8]


@pytest.mark.parametrize("tokens,message", [
    (torch.zeros(4, dtype=torch.long), "2-D integer tensor"),
    (torch.zeros(1, 3), "2-D integer tensor"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.tensor([[1, 97]]), r"token ids must be in \[0, 97\)"),
    (torch.tensor([[-1, 2]]), "token ids must be in"),
    ([[1, 2]], "2-D integer tensor"),
])
def test_bad_tokens(model, tokens, message):
    with pytest.raises(ValueError, match=message):
        model(tokens)


def test_bad_lengths(model):
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths must have shape"):
        model(ids, lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 3\]"):
        model(ids, lengths=torch.tensor([1, 4]))


def test_cache_mismatches(model):
    with pytest.raises(ValueError, match="cache holds 2 rows but tokens have 1"):
        model(torch.zeros(1, 2, dtype=torch.long), model.new_cache(batch_size=2, max_length=4))
    other = random_model(small_config(plan=small_config().plan[:4]))
    with pytest.raises(ValueError, match="built for another model"):
        model(torch.zeros(1, 2, dtype=torch.long), other.new_cache(batch_size=1, max_length=4))
    with pytest.raises(ValueError, match="max_length must be an int <= max_seq_len"):
        model.new_cache(batch_size=1, max_length=10**9)
    with pytest.raises(ValueError, match="batch_size and max_length must be >= 1"):
        model.new_cache(batch_size=0, max_length=4)


def test_unknown_backend():
    from sambay import SambaY

    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        SambaY(small_config(), backend="cuda-magic")
