"""Cached paths equal the uncached full forward: decode, chunked prefill, YOCO prefill, ragged batches."""

from __future__ import annotations

import pytest
import torch

from sambay.config import LayerKind, sambay_plan
from tests.conftest import forward, random_model, small_config
from tests.tolerances import FP32_MODEL, assert_close

M, S, F, G, X = (LayerKind.MAMBA, LayerKind.SLIDING_ATTENTION, LayerKind.FULL_ATTENTION, LayerKind.GMU,
                 LayerKind.CROSS_ATTENTION)

VARIANTS = {
    "sambay-da": small_config(),
    "sambay": small_config(differential=False),
    "samba+yoco": small_config(plan=sambay_plan(8, gmu=False)),
    "samba": small_config(plan=(M, S, M, S, M, S)),
    "transformer++": small_config(plan=(F, F, F, F), differential=False, rope_theta=10000.0),
}


def _tokens(b, t, vocab=97, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _teacher_forced(model, ids, prompt_len):
    cache = model.new_cache(batch_size=ids.shape[0], max_length=ids.shape[1])
    steps = [forward(model, ids[:, :prompt_len], cache, last_only=False)]
    steps += [forward(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])]
    assert cache.seqlens.tolist() == [ids.shape[1]] * ids.shape[0]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 3, 5, 9])  # window is 5: shorter, equal and longer prompts
def test_teacher_forced_decode_equals_full_forward(variant, prompt_len):
    model = random_model(VARIANTS[variant])
    ids = _tokens(2, 17)
    with torch.no_grad():
        full = model(ids)
    assert_close(_teacher_forced(model, ids, prompt_len), full, **FP32_MODEL, what=f"{variant} decode")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 7, 16])  # some longer than the window (5)
def test_chunked_prefill_equals_one_shot(variant, chunk):
    model = random_model(VARIANTS[variant])
    ids = _tokens(2, 23)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_length=32)
        pieces = [forward(model, ids[:, i : i + chunk], cache, last_only=False) for i in range(0, 23, chunk)]
    assert_close(torch.cat(pieces, 1), full, **FP32_MODEL, what=f"{variant} chunk={chunk}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_yoco_last_only_prefill_equals_full_path(variant):
    model = random_model(VARIANTS[variant])
    ids = _tokens(3, 11)
    with torch.no_grad():
        full = model(ids)
        last = model(ids, last_only=True)
        cache = model.new_cache(batch_size=3, max_length=16)
        cached = forward(model, ids, cache)  # with a cache, last-only is the default
    assert last.shape == cached.shape == (3, 1, 97)
    assert_close(last, full[:, -1:], **FP32_MODEL, what="last_only")
    assert_close(cached, full[:, -1:], **FP32_MODEL, what="cached prefill")


def test_yoco_prefill_runs_the_cross_decoder_on_one_token():
    model = random_model(small_config())
    seen = []
    model.cross_decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(_tokens(2, 13), model.new_cache(batch_size=2, max_length=16))
    assert seen == [1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_equals_rows_alone(variant):
    """Rows of different lengths share one batch and one cache: prefill, then decode, then a ragged chunk."""
    model = random_model(VARIANTS[variant])
    lengths = [9, 3, 1, 6]
    rows = [_tokens(1, n + 8, seed=10 + i)[0] for i, n in enumerate(lengths)]
    b, t = len(rows), max(lengths)
    padded = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, :n] = rows[i][:n]
    with torch.no_grad():
        cache = model.new_cache(batch_size=b, max_length=32)
        got = [forward(model, padded, cache, lengths=torch.tensor(lengths))]
        for s in range(4):  # decode steps: each row continues its own sequence
            step = torch.stack([r[n + s] for r, n in zip(rows, lengths, strict=True)]).view(b, 1)
            got.append(forward(model, step, cache))
        extra = [2, 0, 4, 1]  # a ragged chunk after decoding, one row idle
        chunk = torch.zeros(b, 4, dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
            chunk[i, : extra[i]] = r[n + 4 : n + 4 + extra[i]]
        got.append(forward(model, chunk, cache, lengths=torch.tensor(extra)))
        assert cache.seqlens.tolist() == [n + 4 + e for n, e in zip(lengths, extra, strict=True)]
        for i, n in enumerate(lengths):
            alone = model(rows[i][: n + 4 + extra[i]].view(1, -1))[0]  # (t, vocab)
            for s in range(5):
                assert_close(got[s][i, -1], alone[n - 1 + s], **FP32_MODEL, what=f"row {i} step {s}")
            if extra[i]:
                assert_close(got[5][i, -1], alone[n + 3 + extra[i]], **FP32_MODEL, what=f"row {i} chunk")


def test_right_padding_without_cache_leaves_real_positions_unchanged():
    model = random_model(small_config())
    ids = _tokens(1, 7)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        assert_close(model(padded, lengths=torch.tensor([7]))[:, :7], model(ids), **FP32_MODEL, what="pad")


def test_greedy_generation_with_cache_equals_without():
    model = random_model(small_config())
    ids = _tokens(2, 4)
    with torch.no_grad():
        cache = model.new_cache(batch_size=2, max_length=24)
        logits, cached = forward(model, ids, cache), ids
        for _ in range(20):
            cached = torch.cat([cached, logits[:, -1].argmax(-1, keepdim=True)], 1)
            logits = forward(model, cached[:, -1:], cache)
        uncached = ids
        for _ in range(20):
            uncached = torch.cat([uncached, model(uncached)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, uncached)


def test_copy_rows_fans_out_one_prefill_and_reset_clears():
    model = random_model(small_config())
    ids = _tokens(1, 9)
    with torch.no_grad():
        cache = model.new_cache(batch_size=3, max_length=16)
        forward(model, torch.cat([ids, ids, ids]), cache, lengths=torch.tensor([9, 0, 0]))
        cache.copy_rows([0, 0], [1, 2])
        nxt = torch.tensor([[5], [6], [7]])
        out = forward(model, nxt, cache)
        for i in range(3):
            alone = model(torch.cat([ids, nxt[i : i + 1]], 1))[:, -1]
            assert_close(out[i], alone, **FP32_MODEL, what=f"fan-out row {i}")
        cache.reset()
        assert cache.seqlens.tolist() == [0, 0, 0] and all(not t.any() for t in cache.tensors())
    with pytest.raises(ValueError, match="out of range"):
        cache.copy_rows([0], [3])
