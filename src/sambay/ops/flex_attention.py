"""Training attention on PyTorch's FlexAttention: differential and plain GQA, with autograd, on the GPU.

Why: the references (`sambay.ops.attention`) attend in fp32 through `scaled_dot_product_attention` with a
dense (b, t, s) mask on a GPU, which takes SDPA's math backend: the (b, h, t, s) scores are materialised
for the forward and kept for the backward. At the `sambay-da-900m` preset's 8K context that is over
120 GiB without activation checkpointing, and a training step ran at 1% MFU on the H200 (2026-12-02).
FlexAttention (Dong et al., arXiv 2412.05496) compiles a fused flash-style kernel, forward and backward,
from a mask function, and its block mask skips the tiles no query can see: a sliding-window layer does
about window x t work, not t x t.

Same signatures and semantics as `diff_attention_ref` / `attention_ref`; masks come from positions
(`visibility`'s rule, evaluated per tile by the mask function). A differential layer is two FlexAttention
calls (group 1 with K1, group 2 with K2, both over the value pairs [V1 | V2]: FlexAttention takes a value
head size unlike the key's), then λ, the sub-layer RMSNorm and the head interleave in fp32 as the
reference does them. Numerics: the attention itself runs in the inputs' dtype with fp32 softmax
statistics (as the release's flash-attn training did), so in bf16 the two maps are rounded before their
difference, where the reference subtracts in fp32; `tests/ops/test_flex_attention.py` bounds the gap.

Calls the kernel does not fit (a decode step, ``kv_len``, a paged ``block_table``, a head size under 16) go
to the reference.
On the CPU FlexAttention has no backward, so `sambay.ops.for_training` uses it for CUDA tensors only, and
hides it from Dynamo (``--compile``): the kernel is compiled here, once per shape and mask, not traced
into each block's graph.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from sambay.ops.attention import attention_ref, diff_attention_ref, lambda_value, sub_norm_heads, value_pairs

MIN_HEAD_DIM = 16  # FlexAttention's smallest head size; smaller heads (tiny test models) take the reference
SHORT_QUERIES = 128  # fewer queries than this are forced onto the main kernel (`_kernel_options`)
DENSE_MASK_LIMIT = 1 << 26  # query x key pairs above which a block mask is built compiled, not as a dense mask


@cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    from sambay.generate.cuda_graphs import raise_recompile_limit

    raise_recompile_limit()  # one compiled kernel per (shape, mask function, grad mode): more than Dynamo's 8
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor):
    """The kernel compiled (once per shape and mask function) for CUDA tensors; the unfused op on the CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if q.is_cuda else flex_attention


def _plain_causal(q_pos: Tensor, k_pos: Tensor) -> bool:
    """True when every row's queries and keys are positions 0 .. t-1 in order: a training forward (one
    device-to-host read per call)."""
    t = q_pos.shape[1]
    if k_pos.shape[1] != t:
        return False
    index = torch.arange(t, device=q_pos.device)
    return bool(((q_pos == index) & (k_pos == index)).all())


@cache
def _static_mask(t: int, window: int | None, device: torch.device):
    """The block mask of a plain causal (or sliding-window) layout of t tokens, built once and reused: the same
    mask function object every call, so the compiled kernel is not recompiled from one step to the next."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(row, head, qi, kj):
        return kj <= qi

    def windowed(row, head, qi, kj):
        return (kj <= qi) & (kj > qi - window)

    return create_block_mask(causal if window is None else windowed, None, None, t, t, device=device,
                             _compile=device.type == "cuda" and t * t > DENSE_MASK_LIMIT)


class _MaskCache:
    """The last general block mask built, reused while the same position tensors come back. Holding the
    tensors keeps their identity meaningful: a new batch's positions are new tensors, or the same ones at a
    new version."""

    def __init__(self):
        self.key, self.mask = None, None

    def get(self, q_pos: Tensor, k_pos: Tensor, window: int | None):
        key = (q_pos, q_pos._version, k_pos, k_pos._version, window)
        if self.key is None or not all(a is b if isinstance(a, Tensor) else a == b
                                       for a, b in zip(self.key, key, strict=True)):
            self.key, self.mask = key, _block_mask(q_pos, k_pos, window)
        return self.mask


def _block_mask(q_pos: Tensor, k_pos: Tensor, window: int | None):
    """FlexAttention's block mask of `visibility`: query i of row r sees key j iff
    0 <= k_pos[r, j] <= q_pos[r, i] (and k_pos[r, j] > q_pos[r, i] - window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = q_pos.shape
    s = k_pos.shape[1]

    def visible(row, head, qi, kj):
        qp, kp = q_pos[row, qi], k_pos[row, kj]
        seen = (kp >= 0) & (kp <= qp)
        if window is not None:
            seen = seen & (kp > qp - window)
        return seen

    return create_block_mask(visible, b, None, t, s, device=q_pos.device,
                             _compile=q_pos.is_cuda and b * t * s > DENSE_MASK_LIMIT)


_MASKS: dict[int | None, _MaskCache] = {}


def _mask(q_pos: Tensor, k_pos: Tensor, window: int | None):
    """The block mask of a call: the cached static one for a training forward's plain positions, else one built
    from the positions (a new mask function, so the compiled kernel may recompile: packed or cached layouts
    are not what training runs)."""
    if _plain_causal(q_pos, k_pos):
        return _static_mask(q_pos.shape[1], window, q_pos.device)
    if q_pos.is_inference() or k_pos.is_inference():  # no version counter to key a cache on: build it afresh
        return _block_mask(q_pos, k_pos, window)
    return _MASKS.setdefault(window, _MaskCache()).get(q_pos, k_pos, window)


def _kernel_options(t: int) -> dict | None:
    """FlexAttention's kernel options for ``t`` queries: under `SHORT_QUERIES` it would pick its decoding
    kernel, which on the H200 with torch 2.11 and Triton 3.6 found no valid configuration and failed to
    compile (``NoValidChoicesError``, forward and backward, t = 79 at head sizes 32 and 64;
    2026-12-02); forced onto the main kernel, the same calls compile and run."""
    return {"FORCE_USE_FLEX_ATTENTION": True} if t < SHORT_QUERIES else None


def _attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """softmax(q kᵀ / sqrt(hd)) v over the mask's visible keys: (b, hq, t, dv) in q's dtype; no key → 0."""
    return _flex(q)(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask, scale=q.shape[-1] ** -0.5,
                   enable_gqa=q.shape[1] != k.shape[1], kernel_options=_kernel_options(q.shape[2]))


def _fits(q: Tensor, kv_len: Tensor | None, block_table: Tensor | None) -> bool:
    return q.shape[2] > 1 and q.shape[-1] >= MIN_HEAD_DIM and kv_len is None and block_table is None


def diff_attention_flex(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None,
    lambda_q1: Tensor, lambda_k1: Tensor, lambda_q2: Tensor, lambda_k2: Tensor, lambda_init: float,
    subln_weight: Tensor, eps: float, kv_len: Tensor | None = None, block_table: Tensor | None = None,
) -> Tensor:
    """Differential attention on FlexAttention; arguments, shapes and returns as `diff_attention_ref`."""
    if not _fits(q, kv_len, block_table):
        return diff_attention_ref(q, k, v, q_pos, k_pos, window, lambda_q1, lambda_k1, lambda_q2, lambda_k2,
                                  lambda_init, subln_weight, eps, kv_len, block_table)
    mask = _mask(q_pos, k_pos, window)
    v_pairs = value_pairs(v)
    o1 = _attend(q[:, 0::2], k[:, 0::2], v_pairs, mask)  # [A11 | A12]
    o2 = _attend(q[:, 1::2], k[:, 1::2], v_pairs, mask)  # [A21 | A22]
    lam = lambda_value(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init)
    return sub_norm_heads(o1.float() - lam * o2.float(), subln_weight, eps, lambda_init, q.dtype)


def attention_flex(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len: Tensor | None = None,
    block_table: Tensor | None = None,
) -> Tensor:
    """Plain GQA attention on FlexAttention; arguments, shapes and returns as `attention_ref`."""
    if not _fits(q, kv_len, block_table):
        return attention_ref(q, k, v, q_pos, k_pos, window, kv_len, block_table)
    return _attend(q, k, v, _mask(q_pos, k_pos, window)).transpose(1, 2)


__all__ = ["attention_flex", "diff_attention_flex"]
