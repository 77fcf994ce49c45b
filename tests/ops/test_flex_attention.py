"""The FlexAttention training attention (`sambay.ops.flex_attention`) against the references.

On the CPU FlexAttention runs forward only (unfused), in fp32: outputs must equal the reference's for
every layout a training forward builds (fresh causal, a window, GQA, empty slots, cached keys before the
chunk, keys out of order, a query that sees nothing). On a GPU: the compiled kernel in bf16, forward and
gradients within 2x the reference's own bf16 error. The op-table wiring (`for_training`) is checked too.
"""

from __future__ import annotations

import pytest
import torch

from sambay.ops import attention_ref, diff_attention_ref, for_training
from sambay.ops.flex_attention import attention_flex, diff_attention_flex
from tests.tolerances import FP32, assert_close, assert_low_precision

CASES = [  # b, n_heads, n_kv_heads, t, s_extra (cached keys before the chunk), head_dim, window
    (1, 4, 2, 37, 0, 16, None),  # odd length, fresh causal
    (2, 8, 2, 70, 0, 16, 9),  # a window, GQA 4:1
    (2, 4, 4, 33, 11, 16, 5),  # keys cached before the chunk, no GQA
    (1, 40, 20, 19, 0, 16, 512),  # the release's head counts, window longer than the sequence
    (3, 4, 2, 130, 0, 16, 128),  # longer than one 128-token mask block
]


def _inputs(b, h, hk, t, s_extra, hd, seed=0, device="cpu", shuffle=True):
    g = torch.Generator().manual_seed(seed)
    s = s_extra + t
    q, k, v = (torch.randn(b, n, x, hd, generator=g) for n, x in ((h, t), (hk, s), (hk, s)))
    q_pos = torch.arange(s_extra, s).expand(b, t).clone()
    k_pos = torch.arange(s).expand(b, s).clone()
    if shuffle and s_extra:  # cached keys in ring order: any order before the chunk's own keys
        k_pos[:, :s_extra] = k_pos[:, torch.randperm(s_extra, generator=g)]
    if b > 1:
        k_pos[1, : min(3, s)] = -1  # empty slots never seen
    lambdas = [torch.randn(hd, generator=g) * 0.3 for _ in range(4)]
    w = torch.randn(2 * hd, generator=g)
    move = [x.to(device) for x in (q, k, v, q_pos, k_pos, *lambdas, w)]
    return move[:5], move[5:9], move[9]


@pytest.mark.parametrize("b,h,hk,t,s_extra,hd,window", CASES)
def test_diff_attention_flex_equals_the_reference(b, h, hk, t, s_extra, hd, window):
    (q, k, v, q_pos, k_pos), lambdas, w = _inputs(b, h, hk, t, s_extra, hd)
    args = (q, k, v, q_pos, k_pos, window, *lambdas, 0.35, w, 1e-5)
    assert_close(diff_attention_flex(*args), diff_attention_ref(*args), **FP32, what="diff attention")


@pytest.mark.parametrize("b,h,hk,t,s_extra,hd,window", CASES)
def test_plain_attention_flex_equals_the_reference(b, h, hk, t, s_extra, hd, window):
    (q, k, v, q_pos, k_pos), _, _ = _inputs(b, h, hk, t, s_extra, hd, seed=1)
    args = (q, k, v, q_pos, k_pos, window)
    assert_close(attention_flex(*args), attention_ref(*args), **FP32, what="attention")


def test_a_query_that_sees_no_key_gives_zeros():
    (q, k, v, q_pos, k_pos), lambdas, w = _inputs(1, 4, 2, 6, 0, 16)
    k_pos[0, :3] = -1  # queries 0-2 see no key (their own slots are empty)
    out = attention_flex(q, k, v, q_pos, k_pos, None)
    assert out[0, :3].abs().max() == 0
    assert_close(out, attention_ref(q, k, v, q_pos, k_pos, None), **FP32)
    args = (q, k, v, q_pos, k_pos, None, *lambdas, 0.35, w, 1e-5)
    assert_close(diff_attention_flex(*args), diff_attention_ref(*args), **FP32)


def test_calls_the_kernel_does_not_take_go_to_the_reference():
    """A decode step, a kv_len hint and a head size under FlexAttention's 16 run the reference itself."""
    (q, k, v, q_pos, k_pos), lambdas, w = _inputs(2, 4, 2, 1, 9, 16)  # a decode step over 9 cached keys
    kv_len = torch.tensor([10, 6])
    small = _inputs(1, 4, 2, 12, 0, 8)  # head size 8
    calls = [((q, k, v, q_pos, k_pos, 4), lambdas, w, {}), ((q, k, v, q_pos, k_pos, 4), lambdas, w, {"kv_len": kv_len}),
             (small[0] + [None], small[1], small[2], {})]
    for plain, lam, weight, extra in calls:
        assert torch.equal(attention_flex(*plain, **extra), attention_ref(*plain, **extra))
        args = (*plain, *lam, 0.35, weight, 1e-5)
        assert torch.equal(diff_attention_flex(*args, **extra), diff_attention_ref(*args, **extra))


def test_the_mask_is_rebuilt_for_new_positions():
    """The block-mask cache must not hand one batch's mask to the next: other positions in a new tensor, the
    same tensor changed in place, and inference-mode tensors (no version counter) all get their own mask."""
    (q, k, v, q_pos, _), _, _ = _inputs(1, 4, 2, 20, 0, 16)
    packed = q_pos.clone()
    packed[0, 10:] -= 10  # a second document starts at token 10: positions restart
    first = attention_flex(q, k, v, packed, packed, None)
    assert_close(first, attention_ref(q, k, v, packed, packed, None), **FP32)
    packed[0, 15:] -= 5  # the same tensor changed in place: a third document from token 15
    again = attention_flex(q, k, v, packed, packed, None)
    assert_close(again, attention_ref(q, k, v, packed, packed, None), **FP32)
    assert not torch.equal(first, again)
    with torch.inference_mode():
        fresh = packed.clone()
        fresh[0, 5:] = 2  # an inference tensor: no version counter to key the cache on
        assert_close(attention_flex(q, k, v, fresh, fresh, None), attention_ref(q, k, v, fresh, fresh, None), **FP32)


def test_a_training_forward_reuses_one_static_mask():
    """Plain positions 0 .. t-1 (every training forward) take the cached static mask: the same mask function
    each call, so the compiled kernel never recompiles from one step to the next."""
    from sambay.ops import flex_attention as fa

    (q, k, v, q_pos, k_pos), _, _ = _inputs(1, 4, 2, 21, 0, 16, seed=3)
    before = fa._static_mask.cache_info()
    for _ in range(2):  # new position tensors each time, as each forward makes them
        out = attention_flex(q, k, v, q_pos.clone(), k_pos.clone(), 6)
    after = fa._static_mask.cache_info()
    assert after.hits >= before.hits + 1 and after.misses <= before.misses + 1
    assert_close(out, attention_ref(q, k, v, q_pos, k_pos, 6), **FP32)


def test_for_training_wires_flex_attention_for_cuda_tensors_only():
    ops = for_training(scan="reference", attention="flex")
    assert "flex-attention" in ops.name
    (q, k, v, q_pos, k_pos), lambdas, w = _inputs(1, 4, 2, 9, 0, 8)
    args = (q, k, v, q_pos, k_pos, 3, *lambdas, 0.35, w, 1e-5)
    assert torch.equal(ops.diff_attention(*args), diff_attention_ref(*args))  # CPU tensors: the reference
    assert for_training(scan="reference", attention="reference").name == "reference"
    with pytest.raises(ValueError, match="attention kernel 'sdpa'"):
        for_training(attention="sdpa")


def test_short_calls_are_forced_onto_the_main_kernel(monkeypatch):
    """Under 128 queries FlexAttention would take its decoding kernel, which failed to compile on the H200
    (`_kernel_options`); longer calls keep FlexAttention's own choice."""
    import sambay.ops.flex_attention as fa

    seen = []

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], kw["kernel_options"]))
        return torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(fa, "_flex", lambda q: spy)
    for t in (79, 127, 128, 300):
        (q, k, v, q_pos, k_pos), _, _ = _inputs(1, 4, 2, t, 0, 16)
        attention_flex(q, k, v, q_pos, k_pos, None)
    assert seen == [(79, {"FORCE_USE_FLEX_ATTENTION": True}), (127, {"FORCE_USE_FLEX_ATTENTION": True}),
                    (128, None), (300, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("b,h,hk,t,s_extra,hd,window", [(2, 8, 4, 300, 0, 64, 64), (1, 40, 20, 257, 0, 64, None),
                                                        (3, 4, 2, 79, 0, 32, 16)])
def test_flex_attention_bf16_forward_and_gradients_on_gpu(b, h, hk, t, s_extra, hd, window, plain):
    (q, k, v, q_pos, k_pos), lambdas, w = _inputs(b, h, hk, t, s_extra, hd, device="cuda")
    grad = torch.randn(b, t, h, hd, device="cuda")
    ref, fast = (attention_ref, attention_flex) if plain else (diff_attention_ref, diff_attention_flex)
    rest = () if plain else (*lambdas, 0.35, w, 1e-5)

    def run(fn, dtype):
        leaves = [x.to(dtype).detach().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, q_pos, k_pos, window, *rest)
        out.backward(grad.to(out.dtype))
        return [out.detach(), *(x.grad for x in leaves)]

    exact = run(ref, torch.float32)
    low = run(ref, torch.bfloat16)
    got = run(fast, torch.bfloat16)
    for name, g_, l_, e_ in zip(("out", "dq", "dk", "dv"), got, low, exact, strict=True):
        assert_low_precision(g_, l_, e_, what=name)
