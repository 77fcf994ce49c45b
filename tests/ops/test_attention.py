"""Attention references against naive float64 oracles: the release's literal four-call formulation of
differential attention (spec §3.6), and the blocked CPU prefill against one unblocked softmax over all keys
for every key layout the callers build (fresh, [cached | new], [ring | new], out of order, static buffer
with kv_len, paged)."""

from __future__ import annotations

import math

import pytest
import torch

from sambay.cache import ring_positions
from sambay.ops import attention, attention_ref, diff_attention_ref
from sambay.ops.attention import _query_blocks, lambda_value
from tests.tolerances import FP32, assert_close, assert_low_precision


def _softmax_attention(q, k, v, mask):
    """q: (b, h, t, hd), k/v: (b, h, s, hd) already head-matched; mask (b, t, s). float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1)) @ v.double()


def _mask(q_pos, k_pos, window, kv_len=None):
    m = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if kv_len is not None:
        m &= torch.arange(k_pos.shape[1])[None, None, :] < kv_len[:, None, None]
    return m


def _diff_oracle(q, k, v, q_pos, k_pos, window, lam, lam_init, w, eps, kv_len=None):
    """Four flash-style calls with GQA pair j -> kv pair j // group, then subln and head interleave."""
    b, h, t, hd = q.shape
    group = h // k.shape[1]
    mask = _mask(q_pos, k_pos, window, kv_len)

    def expand(x):  # kv pair g serves query pairs g * group .. g * group + group - 1
        return x.repeat_interleave(group, dim=1)

    q1, q2, k1, k2, v1, v2 = q[:, 0::2], q[:, 1::2], k[:, 0::2], k[:, 1::2], v[:, 0::2], v[:, 1::2]
    a11 = _softmax_attention(q1, expand(k1), expand(v1), mask)
    a12 = _softmax_attention(q1, expand(k1), expand(v2), mask)
    a21 = _softmax_attention(q2, expand(k2), expand(v1), mask)
    a22 = _softmax_attention(q2, expand(k2), expand(v2), mask)
    o = torch.cat([a11, a12], -1) - lam * torch.cat([a21, a22], -1)  # (b, h/2, t, 2hd)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * w.double() * (1 - lam_init)
    return o.transpose(1, 2).reshape(b, t, h, hd)


CASES = [  # b, n_heads, n_kv_heads, t, s_extra (cached keys before the chunk), head_dim, window
    (1, 4, 2, 1, 0, 16, None),
    (2, 8, 2, 7, 0, 16, 3),
    (2, 8, 4, 1, 13, 8, 5),  # decode over a cache
    (1, 40, 20, 5, 9, 8, 512),  # the released head counts; window larger than the sequence
    (3, 4, 4, 6, 6, 16, 6),  # window equal to the sequence
]


@pytest.mark.parametrize("b,h,hk,t,s_extra,hd,window", CASES)
def test_diff_attention_matches_four_call_oracle(b, h, hk, t, s_extra, hd, window):
    g = torch.Generator().manual_seed(0)
    s = s_extra + t
    q, k, v = (torch.randn(b, n, x, hd, generator=g) for n, x in ((h, t), (hk, s), (hk, s)))
    q_pos = torch.arange(s_extra, s).expand(b, t)
    k_pos = torch.randperm(s, generator=g).expand(b, s).clone()  # ring buffers hold keys out of order
    k = k[:, :, k_pos[0]]  # keep k/v consistent with the permuted positions (content is random anyway)
    lambdas, lam_init = [torch.randn(hd, generator=g) * 0.3 for _ in range(4)], 0.5
    w = torch.randn(2 * hd, generator=g)
    out = diff_attention_ref(q, k, v, q_pos, k_pos, window, *lambdas, lam_init, w, 1e-5)
    lam = lambda_value(*lambdas, lam_init).double()
    ref = _diff_oracle(q, k, v, q_pos, k_pos, window, lam, lam_init, w, 1e-5)
    assert_close(out, ref, **FP32, what="diff attention")


def test_query_that_sees_no_key_returns_zeros():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    k_pos = torch.tensor([[-1, -1, 5]])  # two empty slots; the third key is in the future of query 0
    lambdas = [torch.full((8,), 0.1)] * 4
    out = diff_attention_ref(q, k, v, torch.tensor([[0, 5]]), k_pos, None, *lambdas, 0.5, torch.ones(16), 1e-5)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0])) and out[:, 1].abs().sum() > 0
    plain = attention_ref(q, k, v, torch.tensor([[0, 5]]), k_pos, None)
    assert torch.equal(plain[:, 0], torch.zeros_like(plain[:, 0]))


def test_plain_attention_uses_standard_gqa_mapping():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 4, 8, generator=g)
    k, v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    pos = torch.arange(4).expand(2, 4)
    out = attention_ref(q, k, v, pos, pos, 2)
    ref = _softmax_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), _mask(pos, pos, 2))
    assert_close(out, ref.transpose(1, 2), **FP32, what="plain attention")


# Blocked CPU prefill: every layout, window and block size against one unblocked float64 softmax ----------

LAYOUTS = ["fresh", "cached", "ring", "shuffled", "static", "paged"]
WINDOWS = [2, 11, 1000, None]  # smaller than, equal to (t = 11) and larger than the sequence; full causal
STARTS = torch.tensor([3, 0, 9])  # ragged cached prefixes, one row with none
PAGE = 4  # block size of the paged layout


def _layout(name, t, window, g):
    """q_pos (b, t), k_pos (b, s) and kv_len (b,) or None, as `sambay.model.attention` builds them.

    fresh: no cache, the keys are the queries' own; cached: [cached keys | new keys] with -1 past each
    row's prefix (full-attention prefill); ring: [ring buffer (slot p % size) | new keys] (sliding-window
    prefill); shuffled: the cached layout with its columns in a random order per row; static and paged:
    a buffer longer than any row, index j = position j, visible up to kv_len (decode-style).
    """
    b = len(STARTS)
    q_pos = STARTS[:, None] + torch.arange(t)  # (b, t)
    before = int(STARTS.max())
    prefix = torch.where(torch.arange(before) < STARTS[:, None], torch.arange(before), -1)  # (b, before)
    if name == "fresh":
        return q_pos, q_pos.clone(), None
    if name == "cached":
        return q_pos, torch.cat([prefix, q_pos], 1), None
    if name == "ring":
        return q_pos, torch.cat([ring_positions(STARTS, window or 5), q_pos], 1), None
    if name == "shuffled":
        k_pos = torch.cat([prefix, q_pos], 1)
        order = torch.stack([torch.randperm(k_pos.shape[1], generator=g) for _ in range(b)])
        return q_pos, k_pos.gather(1, order), None
    end = STARTS + t
    capacity = -(-(int(end.max()) + 3) // PAGE) * PAGE  # room past the longest row, whole pages
    index = torch.arange(capacity).expand(b, capacity)
    return q_pos, torch.where(index < end[:, None], index, -1), end


def _to_pages(x, table):
    """(b, h, s, d) rows → a pool (1 + b * s / PAGE, h, PAGE, d) whose block table[r, j] holds row r's page j."""
    b, h, s, d = x.shape
    pool = torch.zeros(1 + b * (s // PAGE), h, PAGE, d, dtype=x.dtype)  # block 0 stays unused
    for r in range(b):
        for j in range(s // PAGE):
            pool[table[r, j]] = x[r, :, j * PAGE : (j + 1) * PAGE]
    return pool


def _inputs(layout, t, window, n_heads, n_kv_heads, hd, dtype=torch.float32, seed=0):
    """Random q, k, v (k, v as rows) in ``dtype``, the positions, and the k / v / table the op receives."""
    g = torch.Generator().manual_seed(seed)
    q_pos, k_pos, kv_len = _layout(layout, t, window, g)
    b, s = k_pos.shape
    q = torch.randn(b, n_heads, t, hd, generator=g).to(dtype)
    k, v = (torch.randn(b, n_kv_heads, s, hd, generator=g).to(dtype) for _ in range(2))
    k_in, v_in, table = k, v, None
    if layout == "paged":  # pages of each row scattered over the pool in a random order
        table = (torch.randperm(b * s // PAGE, generator=g) + 1).view(b, s // PAGE).to(torch.int32)
        k_in, v_in = _to_pages(k, table), _to_pages(v, table)
    return (q, k, v, q_pos, k_pos, kv_len), (k_in, v_in, table)


def _diff_params(hd, seed=1):
    g = torch.Generator().manual_seed(seed)
    lambdas = [torch.randn(hd, generator=g) * 0.3 for _ in range(4)]
    return lambdas, 0.5, torch.randn(2 * hd, generator=g), 1e-5


def _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, window, hd):
    """The op under test (blocked with the current QUERY_BLOCK) on what a caller passes."""
    if kind == "plain":
        return attention_ref(q, k_in, v_in, q_pos, k_pos, window, kv_len, table)
    lambdas, lam_init, w, eps = _diff_params(hd)
    return diff_attention_ref(q, k_in, v_in, q_pos, k_pos, window, *lambdas, lam_init, w, eps, kv_len, table)


def _oracle(kind, q, k, v, q_pos, k_pos, kv_len, window):
    """One unblocked float64 softmax over all keys (the naive definition), (b, t, n_heads, hd)."""
    if kind == "plain":
        group = q.shape[1] // k.shape[1]
        mask = _mask(q_pos, k_pos, window, kv_len)
        out = _softmax_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask)
        return out.transpose(1, 2)
    lambdas, lam_init, w, eps = _diff_params(q.shape[-1])
    lam = lambda_value(*lambdas, lam_init).double()
    return _diff_oracle(q, k, v, q_pos, k_pos, window, lam, lam_init, w, eps, kv_len)


@pytest.mark.parametrize("kind", ["diff", "plain"])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_blocked_prefill_matches_unblocked_oracle(monkeypatch, layout, window, kind):
    (q, k, v, q_pos, k_pos, kv_len), (k_in, v_in, table) = _inputs(layout, 11, window, 6, 2, 8)
    ref = _oracle(kind, q, k, v, q_pos, k_pos, kv_len, window)
    for block in (1, 4, 7, 11):  # one query per block, a short last block, a single block
        monkeypatch.setattr(attention, "QUERY_BLOCK", block)
        out = _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, window, 8)
        assert_close(out, ref, **FP32, what=f"{kind} {layout} window {window} block {block}")


@pytest.mark.parametrize("kind", ["diff", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_step_matches_oracle(layout, kind):
    (q, k, v, q_pos, k_pos, kv_len), (k_in, v_in, table) = _inputs(layout, 1, 3, 4, 2, 16)
    out = _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, 3, 16)
    assert_close(out, _oracle(kind, q, k, v, q_pos, k_pos, kv_len, 3), **FP32, what=f"{kind} {layout} decode")


@pytest.mark.parametrize("kind", ["diff", "plain"])
@pytest.mark.parametrize("window", [37, None])
def test_default_block_size_on_a_long_prefill(window, kind):
    """The default QUERY_BLOCK (128: three blocks, the last one short) after ragged cached prefixes."""
    (q, k, v, q_pos, k_pos, kv_len), (k_in, v_in, table) = _inputs("cached", 300, window, 6, 2, 8)
    out = _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, window, 8)
    assert_close(out, _oracle(kind, q, k, v, q_pos, k_pos, kv_len, window), **FP32, what=f"{kind} t=300")


@pytest.mark.parametrize("kind", ["diff", "plain"])
@pytest.mark.parametrize("layout", ["cached", "ring", "paged"])
def test_blocked_prefill_bf16(monkeypatch, layout, kind):
    """bf16 inputs: blocked vs the fp64 oracle within 2x the error of the unblocked reference in bf16."""
    (q, k, v, q_pos, k_pos, kv_len), (k_in, v_in, table) = _inputs(layout, 11, 3, 6, 2, 8, torch.bfloat16)
    ref = _oracle(kind, q, k, v, q_pos, k_pos, kv_len, 3)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 10**9)
    unblocked = _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, 3, 8)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    blocked = _run(kind, q, k_in, v_in, q_pos, k_pos, kv_len, table, 3, 8)
    assert blocked.dtype == torch.bfloat16
    assert_low_precision(blocked, unblocked, ref, what=f"{kind} {layout} bf16")


@pytest.mark.parametrize("kind", ["diff", "plain"])
def test_blocked_prefill_gradients(monkeypatch, kind):
    """Training runs the reference on the CPU: gradients through the blocks equal the oracle's."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)
    (q, k, v, q_pos, k_pos, kv_len), _ = _inputs("cached", 11, 3, 6, 2, 8)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    weights = torch.randn(q.shape[0], 11, 6, 8, generator=torch.Generator().manual_seed(2))
    (_run(kind, inputs[0], inputs[1], inputs[2], q_pos, k_pos, kv_len, None, 3, 8) * weights).sum().backward()
    oracle_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    (_oracle(kind, *oracle_inputs, q_pos, k_pos, kv_len, 3) * weights.double()).sum().backward()
    for name, x, y in zip("qkv", inputs, oracle_inputs, strict=True):
        assert_close(x.grad, y.grad, **FP32, what=f"{kind} d{name}")


def test_blocks_see_window_sized_key_ranges(monkeypatch):
    """The work per block follows the architecture: window + block keys for a sliding window over
    [ring | new keys], the keys up to the block's last query for full causal attention."""
    block, t, window = 16, 100, 24
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    start = torch.tensor([40, 33])
    q_pos = start[:, None] + torch.arange(t)
    ring = torch.cat([ring_positions(start, window), q_pos], 1)  # (2, window + t)
    blocks = _query_blocks(q_pos, ring, window)
    assert [rows.start for rows, _ in blocks] == list(range(0, t, block))
    for rows, cols in blocks:  # new key i sits in column window + i
        if rows.start >= window - 1:  # past the ring: keys rows.start - window + 1 .. rows.stop - 1
            assert cols == slice(rows.start + 1, window + rows.stop)
        else:  # the ring's slots are out of order: the range may start at any of them
            assert cols.stop == window + rows.stop
    prefix = torch.where(torch.arange(40) < start[:, None], torch.arange(40), -1)
    full = _query_blocks(q_pos, torch.cat([prefix, q_pos], 1), None)
    assert [cols for _, cols in full] == [slice(0, 40 + rows.stop) for rows, _ in full]
