"""A paged shared K/V (`PagedKV`) gives the same logits as the contiguous one, whatever blocks rows own."""

from __future__ import annotations

import pytest
import torch

from sambay.cache import PagedKV
from tests.conftest import forward, random_model
from tests.model.test_decode_equivalence import VARIANTS, _tokens
from tests.tolerances import FP32_MODEL, assert_close

BLOCK = 16


def paged_cache(model, batch_size: int, max_length: int, *, seed: int = 0, spare: int = 3):
    """A paged cache whose rows own shuffled blocks covering ``max_length`` (``spare`` blocks left unused)."""
    per_row = -(-max_length // BLOCK)
    cache = model.new_cache(batch_size=batch_size, max_length=max_length, block_size=BLOCK,
                            kv_blocks=batch_size * per_row + spare)
    if cache.full:
        order = torch.randperm(batch_size * per_row + spare, generator=torch.Generator().manual_seed(seed)) + 1
        cache.full[0].block_table.copy_(order[: batch_size * per_row].view(batch_size, per_row))
    return cache


@pytest.mark.parametrize("variant", ["sambay-da", "sambay", "transformer++"])
def test_paged_decode_and_chunked_prefill_equal_the_full_forward(variant):
    model = random_model(VARIANTS[variant])
    ids = _tokens(2, 41)
    with torch.no_grad():
        full = model(ids)
        cache = paged_cache(model, 2, 48)
        assert isinstance(cache.full[0], PagedKV) and cache.paged
        pieces = [forward(model, ids[:, i : i + 7], cache, last_only=False) for i in range(0, 21, 7)]
        pieces += [forward(model, ids[:, t : t + 1], cache) for t in range(21, 41)]  # crosses block boundaries
    assert_close(torch.cat(pieces, 1), full, **FP32_MODEL, what=f"{variant} paged")


def _decode_view(model, cache, rows: list[int], tokens: list[int]):
    """One decode step of ``rows`` only, through a view of the cache (the model runner's decode)."""
    index = torch.tensor(rows)
    start = cache.seqlens[index]
    view = cache.view(index, start.clone(), cache.full[0].block_table[index] if cache.paged else None)
    logits = model(torch.tensor(tokens).view(-1, 1), view, check_inputs=False)
    cache.seqlens[index] = start + 1
    return logits


@pytest.mark.parametrize("variant", ["sambay-da", "samba+yoco", "transformer++"])
def test_decoding_a_view_leaves_the_other_rows_untouched(variant):
    """Rows 0 and 2 decode through views (past the window, in another order, with a padding row that
    repeats row 3); row 1 stays mid-prefill and then continues: every row equals its sequence alone."""
    model = random_model(VARIANTS[variant])
    a, b, c = (_tokens(1, 16, seed=s)[0] for s in (21, 22, 23))
    with torch.no_grad():
        cache = paged_cache(model, 4, 32)
        forward(model, torch.stack([a[:8], b[:8], c[:8], c[:8]]), cache, lengths=torch.tensor([8, 3, 6, 0]))
        for s in range(5):  # the window is 5: rows 0 and 2 wrap their rings
            out = _decode_view(model, cache, [2, 0, 3, 3], [int(c[6 + s]), int(a[8 + s]), 7, 7])
        assert cache.seqlens.tolist() == [13, 3, 11, 5]
        for row, seq, n in ((0, a, 13), (2, c, 11)):
            alone = model(seq[:n].view(1, -1))[0, -1]
            assert_close(out[[2, 0].index(row), -1], alone, **FP32_MODEL, what=f"{variant} row {row}")
        chunk = torch.zeros(4, 5, dtype=torch.long)
        chunk[1] = b[3:8]
        got = forward(model, chunk, cache, lengths=torch.tensor([0, 5, 0, 0]), last_only=True)
        assert_close(got[1, -1], model(b[:8].view(1, -1))[0, -1], **FP32_MODEL, what=f"{variant} row 1")


def test_a_view_needs_a_paged_cache():
    model = random_model(VARIANTS["sambay-da"])
    cache = model.new_cache(batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="paged"):
        cache.view(torch.tensor([0]), torch.tensor([0]), None)


def test_paged_fan_out_copies_the_blocks():
    model = random_model(VARIANTS["sambay-da"])
    ids = _tokens(1, 19, seed=5)
    with torch.no_grad():
        cache = paged_cache(model, 3, 24)
        forward(model, torch.cat([ids, ids, ids]), cache, lengths=torch.tensor([19, 0, 0]))
        cache.copy_rows([0, 0], [1, 2])
        nxt = torch.tensor([[5], [6], [7]])
        out = forward(model, nxt, cache)
        for i in range(3):
            alone = model(torch.cat([ids, nxt[i : i + 1]], 1))[:, -1]
            assert_close(out[i], alone, **FP32_MODEL, what=f"paged fan-out row {i}")
        cache.reset()
        assert not cache.full[0].block_table.any() and not cache.seqlens.any()


def test_paged_cache_arguments_are_checked():
    model = random_model(VARIANTS["sambay-da"])
    with pytest.raises(ValueError, match="power of two"):
        model.new_cache(batch_size=1, max_length=8, block_size=24)
    with pytest.raises(ValueError, match="needs a block_size"):
        model.new_cache(batch_size=1, max_length=8, kv_blocks=4)
    cache = model.new_cache(batch_size=2, max_length=40, block_size=16)
    assert cache.full[0].k.shape[0] == 2 * 3 + 1 and cache.full[0].block_table.shape == (2, 3)


@pytest.mark.parametrize("paged", [True, False])
def test_forward_over_selected_rows_equals_the_full_batch(paged):
    """`select` + forward + `update_rows` leaves every row as a forward over all rows (idle ones at length 0)."""
    model = random_model(VARIANTS["sambay-da"])
    ids = _tokens(3, 30, seed=7)
    with torch.no_grad():
        caches = [paged_cache(model, 3, 32) if paged else model.new_cache(batch_size=3, max_length=32)
                  for _ in range(2)]
        for cache in caches:
            forward(model, ids[:, :10], cache)
        full = forward(model, ids[:, 10:20], caches[0], lengths=torch.tensor([10, 0, 10]))
        rows = torch.tensor([0, 2])
        part = caches[1].select(rows)
        partial = forward(model, ids[rows, 10:20], part, lengths=torch.tensor([10, 10]))
        caches[1].update_rows(rows, part)
        assert_close(partial, full[rows], **FP32_MODEL, what="selected rows")
        assert caches[1].seqlens.tolist() == [20, 10, 20]
        nxt = ids[:, 20:21]
        after = forward(model, nxt, caches[1]), forward(model, nxt, caches[0])
        assert_close(*after, **FP32_MODEL, what="after write-back")
