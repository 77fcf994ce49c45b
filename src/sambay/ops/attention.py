"""Attention references: differential attention (the release) and plain GQA attention (Transformer++).

Masks are described by positions, not materialised by the caller, so one signature serves a full
causal prefill, a sliding window, a ring-buffer cache whose slots are out of order (attention has no
position encoding of its own, so the order of keys is irrelevant), a decode step and cross-attention
over the shared KV, and a fast kernel can rebuild the mask tile by tile:
    query i of row r sees key j  ⇔  0 <= k_pos[r, j] <= q_pos[r, i]  and  k_pos[r, j] > q_pos[r, i] - window
A query that sees no key at all returns zeros.

Cost (`_blockwise`, `_query_blocks`): a prefill on the CPU runs in blocks of `QUERY_BLOCK` queries,
each over the narrowest range of key columns that holds every key the block can see, so a sliding-window
layer does about (window + QUERY_BLOCK) keys of work per query and holds one block's scores at a time,
and a full causal layer holds O(QUERY_BLOCK · s) scores instead of O(t · s). Each block is computed
exactly as one unblocked call would compute those queries (the mask decides, the range only skips
columns no query of the block can see). A decode step (t = 1) and any GPU call stay one block over all
keys: static shapes and no host synchronisation, as CUDA graphs and compiled training need.

Paged keys (`sambay.cache.PagedKV`): with ``block_table`` (b, max_blocks), ``k`` and ``v`` are block
pools (n_blocks, n_kv_heads, block_size, head_dim) and key index j of row r is
``pool[block_table[r, j // block_size], :, j % block_size]``; ``k_pos`` then has
``max_blocks * block_size`` columns. The references gather the blocks and proceed as for contiguous keys.

Differential attention (Ye et al., arXiv 2410.05258, §2.1; SambaY paper §3) as the release computes it
(spec §3.6): heads are split by parity (even heads form group 1, odd heads group 2) and GQA maps query
pair j to key/value pair j // (n_heads / n_kv_heads); each group attends with its own keys to the values
of *both* groups, concatenated on the feature axis, so one softmax per group yields [A11 | A12] and
[A21 | A22]; the output is RMSNorm(O1 - λ O2) · (1 - λ_init), interleaved back into the original heads.
All math is fp32; the output is rounded once to the dtype of ``q``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from sambay.cache import blocks_to_rows

# Queries per block of a CPU prefill. A block of B queries under a window w computes B x (B + w) scores,
# of which about B x w can be visible: larger blocks waste more, smaller ones pay more per-call overhead.
# Prefill of the embedded model (window 128) at 512 / 2048 / 3600 tokens, tokens per CPU-second, 1 thread:
# B = 64: 3049 / 3658 / 2934; 128: 3123 / 3816 / 2925; 256: 3029 / 3492 / 2774; 512: 2771 / 2948 / 2330.
QUERY_BLOCK = 128


def visibility(q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len: Tensor | None = None) -> Tensor:
    """Boolean (b, t, s) mask: which keys each query sees (see the module docstring)."""
    q = q_pos.unsqueeze(-1)  # (b, t, 1)
    k = k_pos.unsqueeze(-2)  # (b, 1, s)
    seen = (k >= 0) & (k <= q)
    if window is not None:
        seen &= k > q - window
    if kv_len is not None:
        seen &= torch.arange(k_pos.shape[1], device=k_pos.device).view(1, 1, -1) < kv_len.view(-1, 1, 1)
    return seen


def used_keys(
    k: Tensor, v: Tensor, k_pos: Tensor, kv_len: Tensor | None, block_table: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Contiguous (b, n_kv_heads, s, head_dim) keys, values and their (b, s) positions.

    Gathers block pools into rows. On the CPU, keys past every row's ``kv_len`` are dropped first (a
    decode step over a buffer sized for ``max_length`` then costs what the rows hold); on a GPU the
    shapes stay static, as CUDA graphs need.
    """
    if kv_len is not None and not k.is_cuda:
        s = int(kv_len.max())
        if block_table is not None:
            size = k.shape[2]
            block_table = block_table[:, : -(-s // size)]
            s = block_table.shape[1] * size
        else:
            k, v = k[:, :, :s], v[:, :, :s]
        k_pos = k_pos[:, :s]
    if block_table is None:
        return k, v, k_pos
    return blocks_to_rows(k, block_table), blocks_to_rows(v, block_table), k_pos


def lambda_value(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, lambda_init: float) -> Tensor:
    """λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init, a 0-d fp32 tensor (Differential Transformer eq. 2)."""
    return torch.exp((q1.float() * k1.float()).sum()) - torch.exp((q2.float() * k2.float()).sum()) + lambda_init


def _grouped_attention(q: Tensor, k: Tensor, v: Tensor, seen: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(hd)) v in fp32, GQA by reshaping queries into their key groups.

    q: (b, hq, t, hd) with hq a multiple of hk; k: (b, hk, s, hd); v: (b, hk, s, dv); seen: (b, t, s).
    Returns (b, hq, t, dv) fp32; rows with no visible key are 0.
    """
    b, hq, t, hd = q.shape
    hk = k.shape[1]
    group = hq // hk
    qg = q.float().reshape(b, hk, group * t, hd)  # query head h lives in key group h // group
    mask = seen.unsqueeze(1).repeat(1, 1, group, 1)  # (b, 1, group * t, s)
    out = F.scaled_dot_product_attention(qg, k.float(), v.float(), attn_mask=mask, scale=hd**-0.5)
    out = out.reshape(b, hq, t, v.shape[-1])
    return torch.where(seen.any(-1).view(b, 1, t, 1), out, 0.0)


def _key_columns(q_pos: Tensor, k_pos: Tensor, window: int | None) -> slice:
    """The key columns from the first to the last that some query of ``q_pos`` (b, tq) may see.

    Per row, a visible key lies in [oldest query - window + 1, newest query]; columns outside the
    returned range hold no such key in any row. Keys in any order are safe: the range only widens.
    """
    maybe = (k_pos >= 0) & (k_pos <= q_pos.max(1, keepdim=True).values)  # (b, s)
    if window is not None:
        maybe &= k_pos > q_pos.min(1, keepdim=True).values - window
    cols = maybe.any(0).nonzero().flatten()
    return slice(int(cols[0]), int(cols[-1]) + 1) if len(cols) else slice(0, 0)


def _query_blocks(q_pos: Tensor, k_pos: Tensor, window: int | None) -> list[tuple[slice, slice]]:
    """(query columns, key columns) pairs of a CPU prefill that cover every visible (query, key) pair.

    Blocks of `QUERY_BLOCK` queries, each with its `_key_columns`: in the callers' layouts ([cached keys |
    new keys], [ring | new keys]) that is about window + block columns for a sliding window and the keys
    up to the block's last query for full causal attention.
    """
    t = q_pos.shape[1]
    rows = [slice(i, min(i + QUERY_BLOCK, t)) for i in range(0, t, QUERY_BLOCK)]
    return [(r, _key_columns(q_pos[:, r], k_pos, window)) for r in rows]


def _blockwise(
    attend: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
    k_pos: Tensor, window: int | None, kv_len: Tensor | None,
) -> Tensor:
    """``attend(q, k, v, seen)`` over all keys at once, or per block of `_query_blocks` in a CPU prefill.

    q: (b, hq, t, hd); k: (b, hk, s, hd); v: (b, hv, s, dv); ``attend`` gets a block of tq queries, its
    keys and values and their (b, tq, sk) `visibility`, and returns (b, hq, tq, ·); blocks join on t.
    A decode step and a GPU call are one block (static shapes, no host synchronisation).
    """
    if q.shape[2] == 1 or q.is_cuda:
        return attend(q, k, v, visibility(q_pos, k_pos, window, kv_len))
    if kv_len is not None:  # the hint as positions (-1: never visible), so it survives slicing the key columns
        index = torch.arange(k_pos.shape[1], device=k_pos.device).view(1, -1)
        k_pos = torch.where(index < kv_len.view(-1, 1), k_pos, -1)
    out = [
        attend(q[:, :, rows], k[:, :, cols], v[:, :, cols], visibility(q_pos[:, rows], k_pos[:, cols], window))
        for rows, cols in _query_blocks(q_pos, k_pos, window)
    ]
    return torch.cat(out, dim=2)


def _differential(q: Tensor, k: Tensor, v_pairs: Tensor, seen: Tensor, lambda_full: Tensor) -> Tensor:
    """[A11 | A12] - λ [A21 | A22] for one block of queries: (b, n_heads/2, tq, 2hd) fp32, before the norm.

    q: (b, n_heads, tq, hd); k: (b, n_kv_heads, sk, hd); v_pairs: (b, n_kv_heads/2, sk, 2hd); seen: (b, tq, sk).
    """
    o1 = _grouped_attention(q[:, 0::2], k[:, 0::2], v_pairs, seen)  # (b, n_heads/2, tq, 2hd): [A11 | A12]
    o2 = _grouped_attention(q[:, 1::2], k[:, 1::2], v_pairs, seen)  # [A21 | A22]
    return o1 - lambda_full * o2


def value_pairs(v: Tensor) -> Tensor:
    """(b, n_kv_heads, s, hd) values → (b, n_kv_heads/2, s, 2hd) [v1 | v2]: each group attends to both."""
    return torch.cat([v[:, 0::2], v[:, 1::2]], dim=-1)


def sub_norm_heads(o: Tensor, subln_weight: Tensor, eps: float, lambda_init: float, dtype: torch.dtype) -> Tensor:
    """O1 - λ O2 (b, n_heads/2, t, 2hd) fp32 → RMSNorm · (1 - λ_init), pair j back into heads 2j, 2j+1:
    (b, t, n_heads, hd) in ``dtype``."""
    b, pairs, t, two_hd = o.shape
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * subln_weight.float() * (1.0 - lambda_init)
    return o.transpose(1, 2).reshape(b, t, 2 * pairs, two_hd // 2).to(dtype)


def diff_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    window: int | None,
    lambda_q1: Tensor,
    lambda_k1: Tensor,
    lambda_q2: Tensor,
    lambda_k2: Tensor,
    lambda_init: float,
    subln_weight: Tensor,
    eps: float,
    kv_len: Tensor | None = None,
    block_table: Tensor | None = None,
) -> Tensor:
    """Differential attention with the release's even/odd head pairing and sub-layer RMSNorm.

    Args:
        q: (b, n_heads, t, head_dim).
        k, v: (b, n_kv_heads, s, head_dim).
        q_pos: (b, t) int64 absolute positions of the queries.
        k_pos: (b, s) int64 absolute positions of the keys; negative = empty slot.
        window: sliding-window size (None = full causal).
        lambda_q1, lambda_k1, lambda_q2, lambda_k2: (head_dim,) fp32 vectors of the layer's λ, one scalar
            for all heads: λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init (computed here, so a kernel needs no
            extra launches for it).
        lambda_init: the layer's λ_init = 0.8 - 0.6 exp(-0.3 · layer_index).
        subln_weight: (2 * head_dim,) RMSNorm weight over the concatenated value halves.
        eps: RMSNorm epsilon.
        kv_len: (b,) optional hint: keys at index >= kv_len[b] are never visible to row b, so a kernel
            may stop there (decode over a static cache buffer).
        block_table: (b, max_blocks) int: k and v are block pools (see the module docstring).

    Layout contract that fast kernels rely on: when t > 1, key ``s - t + i`` is the key of query ``i``
    (the call's own keys come last, in order); the first ``s - t`` keys may be in any order.

    Returns:
        (b, t, n_heads, head_dim) in ``q.dtype``.
    """
    k, v, k_pos = used_keys(k, v, k_pos, kv_len, block_table)
    lambda_full = lambda_value(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init)
    attend = partial(_differential, lambda_full=lambda_full)
    o = _blockwise(attend, q, k, value_pairs(v), q_pos, k_pos, window, kv_len)  # (b, n_heads/2, t, 2hd)
    return sub_norm_heads(o, subln_weight, eps, lambda_init, q.dtype)


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len: Tensor | None = None,
    block_table: Tensor | None = None,
) -> Tensor:
    """Plain softmax attention with GQA (query head h reads key head h // (n_heads / n_kv_heads)).

    Args: as `diff_attention_ref` (q: (b, n_heads, t, hd); k, v: (b, n_kv_heads, s, hd)).

    Returns:
        (b, t, n_heads, head_dim) in ``q.dtype``.
    """
    k, v, k_pos = used_keys(k, v, k_pos, kv_len, block_table)
    out = _blockwise(_grouped_attention, q, k, v, q_pos, k_pos, window, kv_len)  # (b, n_heads, t, hd) fp32
    return out.transpose(1, 2).to(q.dtype)
