"""Differential attention reference against the release's literal four-call formulation (spec §3.6)."""

from __future__ import annotations

import math

import pytest
import torch

from sambay.ops import attention_ref, diff_attention_ref
from sambay.ops.attention import lambda_value
from tests.tolerances import FP32, assert_close


def _softmax_attention(q, k, v, mask):
    """q: (b, h, t, hd), k/v: (b, h, s, hd) already head-matched; mask (b, t, s). float64."""
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1)) @ v.double()


def _mask(q_pos, k_pos, window):
    m = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
    if window is not None:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    return m


def _diff_oracle(q, k, v, q_pos, k_pos, window, lam, lam_init, w, eps):
    """Four flash-style calls with GQA pair j -> kv pair j // group, then subln and head interleave."""
    b, h, t, hd = q.shape
    group = h // k.shape[1]
    mask = _mask(q_pos, k_pos, window)

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
