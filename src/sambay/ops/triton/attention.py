"""Triton attention: differential (the release) and plain GQA, for prefill and for decode.

Same signatures and semantics as `sambay.ops.attention` (masks come from positions; read its
docstring for the differential-attention math and the layout contract).

Prefill (`_prefill`, t > 1): flash-attention with an online softmax (base 2), one program per (query
block, query unit, row). A differential unit is a head pair (2j, 2j+1): both halves are computed in the
same program, each against its own keys (kv heads 2g and 2g+1) and the values of both, read once as one
(BN, 2 head_dim) tile [V1 | V2], so each half's p·V is one product that yields [A11 | A12] (resp.
[A21 | A22]); λ, the sub-layer RMSNorm and the head interleave are applied before the single store. Keys
are visited in two ranges: the cached keys before the call's own (masked by position; a block that no
query of the program can see, such as an empty ring slot or one the window has left, is skipped whole),
then only those of the call's own keys that the query block can see (causal, and the window), which is
what makes a long sliding-window prefill linear in t. The launch knobs are benchmarks/attn_prefill.py's.

Decode (`_decode` + `_combine`, t = 1): split-K ("flash-decoding"). One program per (row, kv unit,
split) reads each K and V block once and serves every query head that maps to it: for the
differential release, the 2 query pairs of a kv pair, both halves, i.e. K1, K2, V1, V2 each read once
(the reference's four-call formulation reads each twice). The few query rows are padded to a 16-row
tile so the products run on tensor cores; the kernel stays bound by the K/V bytes it streams. Splits
divide each row's visible keys (`kv_len`, read on the device), so the grid is static and CUDA-graph
safe. `_combine` merges the splits and applies λ and the RMSNorm. Paged keys (a `block_table`): the
decode kernel looks up each key's block (one int per key, from the same few cache lines); a prefill
over pages gathers them first (its cost is dominated by the attention FLOPs, not by that copy).

Row (batch) program ids are widened to int64 before they scale a stride: a 32K-token cache of 64 rows
holds more than 2^31 elements, and int32 offsets would wrap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sambay.ops.attention import used_keys

BLOCK_M = 64  # queries per prefill program
BLOCK_N = 64  # keys per prefill step
PREFILL_WARPS = 4  # warps per prefill program (0: 8 at head_dim >= 64, else 4)
PREFILL_STAGES = 2  # software-pipelined key blocks in flight per prefill program
# The prefill knobs are benchmarks/attn_prefill.py's best for a 1 x 32K prefill (1 full-attention and 8 sliding-window
# calls; docs/results/attn-prefill-h200.json): 47.7 ms of attention against 81.0 at 64 x 64 with 8 warps and 3 stages.
BLOCK_N_DECODE = 64  # keys per decode step
DECODE_ROWS = 16  # query rows per decode program, padded up to the smallest tl.dot tile (2 real rows here)
TARGET_PROGRAMS = 2048  # decode grid target: ~16 programs per SM on the H200's 132, enough loads in flight
MIN_BLOCKS_PER_SPLIT = 4  # decode: each split reads at least this many key blocks
DECODE_WARPS = 4
DECODE_STAGES = 3  # software-pipelined key blocks in flight per decode program
LOG2E = 1.4426950408889634  # the prefill's online softmax runs in base 2: exp2(s · log2 e) = exp(s)


@triton.jit
def _online_update(q, k, m, denom, acc_a, acc_b, va, vb, seen, scale, TWO_V: tl.constexpr, PREC: tl.constexpr):
    """One key block of an online softmax: scores q kᵀ, then acc_{a,b} += p v_{a,b} (rescaled)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc_a = acc_a * alpha[:, None] + tl.dot(p.to(va.dtype), va, input_precision=PREC)
    if TWO_V:
        acc_b = acc_b * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PREC)
    return m_new, denom, acc_a, acc_b


@triton.jit
def _finish_and_store(
    o1a, o1b, o2a, o2b, out_ptr, w_ptr, lam_ptr, lam_init, eps, rows, row_mask, s_oh, h_first,
    HD: tl.constexpr, DIFF: tl.constexpr,
):
    # lam_ptr: the four λ vectors, (4, HD) fp32 rows q1, k1, q2, k2
    """Differential: RMSNorm(O1 - λ O2) · (1 - λ_init) into heads h_first, h_first + 1; plain: O1 into h_first."""
    offs_d = tl.arange(0, HD)
    if DIFF:
        lq1 = tl.load(lam_ptr + offs_d).to(tl.float32)
        lk1 = tl.load(lam_ptr + HD + offs_d).to(tl.float32)
        lq2 = tl.load(lam_ptr + 2 * HD + offs_d).to(tl.float32)
        lk2 = tl.load(lam_ptr + 3 * HD + offs_d).to(tl.float32)
        lam = tl.exp(tl.sum(lq1 * lk1, 0)) - tl.exp(tl.sum(lq2 * lk2, 0)) + lam_init
        oa = o1a - lam * o2a
        ob = o1b - lam * o2b
        r = tl.rsqrt((tl.sum(oa * oa, 1) + tl.sum(ob * ob, 1)) / (2 * HD) + eps)
        scale = r[:, None] * (1.0 - lam_init)
        oa = oa * scale * tl.load(w_ptr + offs_d).to(tl.float32)[None, :]
        ob = ob * scale * tl.load(w_ptr + HD + offs_d).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] + h_first * s_oh + offs_d[None, :],
                 oa.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
        tl.store(out_ptr + rows[:, None] + (h_first + 1) * s_oh + offs_d[None, :],
                 ob.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        tl.store(out_ptr + rows[:, None] + h_first * s_oh + offs_d[None, :],
                 o1a.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _online_update_wide(q, k, v, m, denom, acc, seen, scale, PREC: tl.constexpr):
    """One key block of an online softmax in base 2 (``scale`` includes log2 e): acc += p v over all of v's
    columns at once (a differential pair's [V1 | V2]: one (BN, 2 HD) product instead of two)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, denom, acc


@triton.jit
def _key_block(q1, q2, k_ptr, v_ptr, kidx, kmask, seen, v_cols, offs_d, b, kh1, s_kb, s_kh, s_ks, s_vb, s_vs,
               m1, l1, acc1, m2, l2, acc2, scale, DIFF: tl.constexpr, PREC: tl.constexpr):
    """One block of keys for a prefill program: K1 (and K2) and the [V1 | V2] tile loaded once, both halves'
    online softmaxes updated."""
    k_rows = k_ptr + b * s_kb + kidx[:, None] * s_ks + offs_d[None, :]
    k1 = tl.load(k_rows + kh1 * s_kh, mask=kmask[:, None], other=0.0)
    v = tl.load(v_ptr + b * s_vb + kidx[:, None] * s_vs + v_cols[None, :], mask=kmask[:, None], other=0.0)
    m1, l1, acc1 = _online_update_wide(q1, k1, v, m1, l1, acc1, seen, scale, PREC)
    if DIFF:
        k2 = tl.load(k_rows + (kh1 + 1) * s_kh, mask=kmask[:, None], other=0.0)
        m2, l2, acc2 = _online_update_wide(q2, k2, v, m2, l2, acc2, seen, scale, PREC)
    return m1, l1, acc1, m2, l2, acc2


@triton.jit
def _prefill(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, out_ptr, w_ptr, lam_ptr,  # pointers
    T, S, n_prefix, window, lam_init, eps, scale,  # dimensions and scalars
    s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ob, s_ot, s_oh, s_qpb, s_kpb,  # strides
    G: tl.constexpr, HD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,  # meta-parameters
    DIFF: tl.constexpr, HAS_WINDOW: tl.constexpr, PREC: tl.constexpr,
):
    VD: tl.constexpr = 2 * HD if DIFF else HD  # value columns per program: a differential pair reads [V1 | V2]
    pid_m, unit, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, HD)
    offs_v = tl.arange(0, VD)
    mask_m = offs_m < T
    qpos = tl.load(qpos_ptr + b * s_qpb + offs_m, mask=mask_m, other=-1)
    if DIFF:  # unit = query pair (2u, 2u + 1); its kv pair is (2g, 2g + 1), g = u // G
        h1 = 2 * unit
        kh1 = 2 * (unit // G)
    else:
        h1 = unit
        kh1 = unit // G
    v_cols = (kh1 + offs_v // HD) * s_vh + offs_v % HD  # [V1 | V2]: head kh1's columns, then kh1 + 1's
    q_rows = q_ptr + b * s_qb + offs_m[:, None] * s_qt + offs_d[None, :]
    q1 = tl.load(q_rows + h1 * s_qh, mask=mask_m[:, None], other=0.0)
    q2 = q1
    if DIFF:
        q2 = tl.load(q_rows + (h1 + 1) * s_qh, mask=mask_m[:, None], other=0.0)
    m1 = tl.full((BM,), float("-inf"), tl.float32)
    m2 = tl.full((BM,), float("-inf"), tl.float32)
    l1 = tl.zeros((BM,), tl.float32)
    l2 = tl.zeros((BM,), tl.float32)
    acc1 = tl.zeros((BM, VD), tl.float32)
    acc2 = tl.zeros((BM, VD), tl.float32)
    m_lo = pid_m * BM
    # The cached keys before the call's own: a block none of whose keys this query block can see (an empty
    # ring, or a window that ends before it) is skipped whole, so a sliding-window prefill over a ring pays
    # only for the ring slots its first queries reach.
    for start in range(0, n_prefix, BN):
        kidx = start + tl.arange(0, BN)
        kpos = tl.load(kpos_ptr + b * s_kpb + kidx, mask=kidx < n_prefix, other=-1)
        seen = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            seen = seen & (kpos[None, :] > qpos[:, None] - window)
        if tl.max(seen.to(tl.int32)) > 0:
            m1, l1, acc1, m2, l2, acc2 = _key_block(
                q1, q2, k_ptr, v_ptr, kidx, kidx < n_prefix, seen, v_cols, offs_d, b, kh1, s_kb, s_kh, s_ks,
                s_vb, s_vs, m1, l1, acc1, m2, l2, acc2, scale, DIFF, PREC)
    # The call's own keys: only those the query block can see (causal, and the window).
    own_lo = n_prefix
    if HAS_WINDOW:
        own_lo = n_prefix + tl.maximum(m_lo - window + 1, 0)
    own_hi = n_prefix + tl.minimum(m_lo + BM, T)
    for start in range(own_lo, own_hi, BN):
        kidx = start + tl.arange(0, BN)
        kmask = kidx < own_hi
        kpos = tl.load(kpos_ptr + b * s_kpb + kidx, mask=kmask, other=-1)
        seen = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            seen = seen & (kpos[None, :] > qpos[:, None] - window)
        m1, l1, acc1, m2, l2, acc2 = _key_block(
            q1, q2, k_ptr, v_ptr, kidx, kmask, seen, v_cols, offs_d, b, kh1, s_kb, s_kh, s_ks, s_vb, s_vs,
            m1, l1, acc1, m2, l2, acc2, scale, DIFF, PREC)
    o = acc1 * tl.where(l1 > 0, 1.0 / tl.where(l1 > 0, l1, 1.0), 0.0)[:, None]  # rows that saw no key give 0
    if DIFF:  # RMSNorm(O1 - λ O2) · (1 - λ_init) over the pair's 2 HD columns, into heads h1, h1 + 1
        lq1 = tl.load(lam_ptr + offs_d).to(tl.float32)
        lk1 = tl.load(lam_ptr + HD + offs_d).to(tl.float32)
        lq2 = tl.load(lam_ptr + 2 * HD + offs_d).to(tl.float32)
        lk2 = tl.load(lam_ptr + 3 * HD + offs_d).to(tl.float32)
        lam = tl.exp(tl.sum(lq1 * lk1, 0)) - tl.exp(tl.sum(lq2 * lk2, 0)) + lam_init
        o = o - lam * acc2 * tl.where(l2 > 0, 1.0 / tl.where(l2 > 0, l2, 1.0), 0.0)[:, None]
        r = tl.rsqrt(tl.sum(o * o, 1) / VD + eps)
        o = o * (r[:, None] * (1.0 - lam_init)) * tl.load(w_ptr + offs_v).to(tl.float32)[None, :]
    out_cols = (h1 + offs_v // HD) * s_oh + offs_v % HD
    tl.store(out_ptr + (b * s_ob + offs_m * s_ot)[:, None] + out_cols[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None])


@triton.jit
def _decode(
    q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, kvlen_ptr, bt_ptr, m_ptr, l_ptr, acc_ptr,  # pointers
    S, window, scale, page,  # dimensions and scalars
    s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_kpb, s_btb,  # strides
    G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, BN: tl.constexpr, NSPLIT: tl.constexpr,  # meta
    DIFF: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KVLEN: tl.constexpr, PAGED: tl.constexpr,
    PREC: tl.constexpr,
):
    g, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n_kv_units = tl.num_programs(0)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, HD)
    gmask = offs_g < G
    if DIFF:  # kv pair g serves query pairs g*G .. g*G + G - 1: heads 2j (group 1) and 2j + 1 (group 2)
        heads = 2 * (g * G + offs_g)
        kh1 = 2 * g
    else:
        heads = g * G + offs_g
        kh1 = g
    q_rows = q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :]
    q1 = tl.load(q_rows, mask=gmask[:, None], other=0.0)  # (GP, HD): GP >= 16 rows so tl.dot applies
    q2 = q1
    if DIFF:
        q2 = tl.load(q_rows + s_qh, mask=gmask[:, None], other=0.0)
    qpos = tl.load(qpos_ptr + b)
    n_keys = S
    if HAS_KVLEN:
        n_keys = tl.minimum(tl.load(kvlen_ptr + b), S)
    per_split = tl.cdiv(n_keys, NSPLIT)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)
    m1 = tl.full((GP,), float("-inf"), tl.float32)
    m2 = tl.full((GP,), float("-inf"), tl.float32)
    l1 = tl.zeros((GP,), tl.float32)
    l2 = tl.zeros((GP,), tl.float32)
    a1a = tl.zeros((GP, HD), tl.float32)
    a1b = tl.zeros((GP, HD), tl.float32)
    a2a = tl.zeros((GP, HD), tl.float32)
    a2b = tl.zeros((GP, HD), tl.float32)
    for start in range(lo, hi, BN):
        kidx = start + tl.arange(0, BN)
        kmask = kidx < hi
        kpos = tl.load(kpos_ptr + b * s_kpb + kidx, mask=kmask, other=-1)
        seen = (kpos >= 0) & (kpos <= qpos)
        if HAS_WINDOW:
            seen = seen & (kpos > qpos - window)
        seen = seen[None, :] & (offs_g >= 0)[:, None]  # (GP, BN)
        if PAGED:  # key j of row b: block bt[b, j // page], offset j % page (s_kb is the block stride)
            block = tl.load(bt_ptr + b * s_btb + kidx // page, mask=kmask, other=0).to(tl.int64)
            k_rows = k_ptr + block[:, None] * s_kb + (kidx % page)[:, None] * s_ks + offs_d[None, :]
            v_rows = v_ptr + block[:, None] * s_vb + (kidx % page)[:, None] * s_vs + offs_d[None, :]
        else:
            k_rows = k_ptr + b * s_kb + kidx[:, None] * s_ks + offs_d[None, :]
            v_rows = v_ptr + b * s_vb + kidx[:, None] * s_vs + offs_d[None, :]
        k1 = tl.load(k_rows + kh1 * s_kh, mask=kmask[:, None], other=0.0)
        va = tl.load(v_rows + kh1 * s_vh, mask=kmask[:, None], other=0.0)
        if DIFF:  # K1, K2, V1, V2 each read once for all 2G query heads of this kv pair
            k2 = tl.load(k_rows + (kh1 + 1) * s_kh, mask=kmask[:, None], other=0.0)
            vb = tl.load(v_rows + (kh1 + 1) * s_vh, mask=kmask[:, None], other=0.0)
            m1, l1, a1a, a1b = _online_update(q1, k1, m1, l1, a1a, a1b, va, vb, seen, scale, True, PREC)
            m2, l2, a2a, a2b = _online_update(q2, k2, m2, l2, a2a, a2b, va, vb, seen, scale, True, PREC)
        else:
            m1, l1, a1a, a1b = _online_update(q1, k1, m1, l1, a1a, a1b, va, va, seen, scale, False, PREC)
    part = (b * n_kv_units + g) * NSPLIT + split  # partial-result slot of this program
    ml = (part * GP + offs_g) * 2  # only the G real query rows are stored: `_combine` reads no padding
    tl.store(m_ptr + ml, m1, mask=gmask)
    tl.store(m_ptr + ml + 1, m2, mask=gmask)
    tl.store(l_ptr + ml, l1, mask=gmask)
    tl.store(l_ptr + ml + 1, l2, mask=gmask)
    acc = acc_ptr + ((part * GP + offs_g[:, None]) * 4) * HD + offs_d[None, :]
    rows = gmask[:, None]
    tl.store(acc, a1a, mask=rows)
    tl.store(acc + HD, a1b, mask=rows)
    tl.store(acc + 2 * HD, a2a, mask=rows)
    tl.store(acc + 3 * HD, a2b, mask=rows)


@triton.jit
def _merge(m_ptr, l_ptr, acc_ptr, base, gp, grp, NSPLIT: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr):
    """Merge the NSPLIT partial softmaxes of one query head (slot gp, group grp) → its (a, b) value halves."""
    offs_s = tl.arange(0, NSPLIT)
    offs_d = tl.arange(0, HD)
    slot = (base + offs_s) * GP + gp  # (NSPLIT,) partial slots of this head
    m = tl.load(m_ptr + slot * 2 + grp)
    denom = tl.load(l_ptr + slot * 2 + grp)
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.exp(m - m_safe)  # 0 for empty splits (m = -inf)
    total = tl.sum(w * denom, 0)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    rows = acc_ptr + (slot[:, None] * 4 + 2 * grp) * HD + offs_d[None, :]
    oa = tl.sum(w[:, None] * tl.load(rows), 0) * inv
    ob = tl.sum(w[:, None] * tl.load(rows + HD), 0) * inv
    return oa, ob


@triton.jit
def _combine(
    m_ptr, l_ptr, acc_ptr, out_ptr, w_ptr, lam_ptr,  # pointers
    n_kv_units, lam_init, eps,  # dimensions and scalars
    s_ob, s_oh,  # strides
    G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, NSPLIT: tl.constexpr, DIFF: tl.constexpr,
):
    unit, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    base = (b * n_kv_units + unit // G) * NSPLIT  # first partial slot of this unit's kv unit
    gp = unit % G
    o1a, o1b = _merge(m_ptr, l_ptr, acc_ptr, base, gp, 0, NSPLIT, GP, HD)
    o2a, o2b = _merge(m_ptr, l_ptr, acc_ptr, base, gp, 1, NSPLIT, GP, HD)
    row = b * s_ob + tl.zeros((1,), tl.int64)  # a one-row tile so the shared store helper applies
    h_first = 2 * unit if DIFF else unit
    _finish_and_store(o1a[None, :], o1b[None, :], o2a[None, :], o2b[None, :], out_ptr, w_ptr, lam_ptr,
                      lam_init, eps, row, row >= 0, s_oh, h_first, HD, DIFF)


def _check(q: Tensor, k: Tensor, v: Tensor, diff: bool, paged: bool) -> None:
    b, n_heads, _, hd = q.shape
    n_kv = k.shape[1]
    if k.shape != v.shape or (k.shape[0] != b and not paged) or k.shape[3] != hd or n_heads % n_kv:
        raise ValueError(f"attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hd not in (16, 32, 64, 128):
        raise ValueError(f"the Triton attention kernels need head_dim in (16, 32, 64, 128), got {hd}")
    if diff and (n_heads % 2 or n_kv % 2):
        raise ValueError("differential attention needs even n_heads and n_kv_heads")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"attention: {name} must be contiguous in head_dim, got strides {x.stride()}")


def _lambda_rows(lambdas: tuple[Tensor, ...] | None, like: Tensor) -> Tensor:
    """The four λ vectors as one (4, head_dim) fp32 tensor the kernels read (``like`` as a dummy for plain)."""
    return like if lambdas is None else torch.stack(lambdas).float()


def _run(q, k, v, q_pos, k_pos, window, kv_len, diff, lambdas, lam_init, weight, eps, block_table) -> Tensor:
    b, n_heads, t, hd = q.shape
    if block_table is not None and t > 1:  # prefill over pages: gather them (the cost is the keys' bytes, once)
        k, v, k_pos = used_keys(k, v, k_pos, None, block_table)
        block_table = None
    paged = block_table is not None
    s, n_kv = k_pos.shape[1], k.shape[1]
    _check(q, k, v, diff, paged)
    out = torch.empty(b, t, n_heads, hd, dtype=q.dtype, device=q.device)
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    group = n_heads // n_kv  # query units per kv unit (pairs per pair for differential attention)
    n_units = n_heads // 2 if diff else n_heads
    w = weight if weight is not None else q
    lam_t = _lambda_rows(lambdas, q_pos)
    has_window = window is not None
    if t > 1:
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        _prefill[(triton.cdiv(t, BLOCK_M), n_units, b)](
            q, k, v, q_pos, k_pos, out, w, lam_t,
            t, s, s - t, window or 0, lam_init, eps, hd**-0.5 * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            q_pos.stride(0), k_pos.stride(0),
            G=group, HD=hd, BM=BLOCK_M, BN=BLOCK_N, DIFF=diff, HAS_WINDOW=has_window, PREC=prec,
            # the knobs were swept at head_dim 64; at 128 a differential pair's two (BM, 256) fp32 accumulators
            # need 8 warps' registers
            num_warps=max(PREFILL_WARPS, 8) if hd > 64 else (PREFILL_WARPS or (8 if hd >= 64 else 4)),
            num_stages=PREFILL_STAGES,
        )
        return out
    n_kv_units = n_kv // 2 if diff else n_kv
    gp = max(DECODE_ROWS, triton.next_power_of_2(group))
    want = triton.cdiv(TARGET_PROGRAMS, b * n_kv_units)
    nsplit = max(1, min(triton.next_power_of_2(want),
                        triton.next_power_of_2(triton.cdiv(s, MIN_BLOCKS_PER_SPLIT * BLOCK_N_DECODE))))
    slots = b * n_kv_units * nsplit * gp
    m_buf = torch.empty(slots * 2, device=q.device)
    l_buf = torch.empty(slots * 2, device=q.device)
    acc = torch.empty(slots * 4 * hd, device=q.device)
    kvl = kv_len.contiguous() if kv_len is not None else q_pos
    table = block_table.contiguous() if paged else q_pos
    _decode[(n_kv_units, nsplit, b)](
        q, k, v, q_pos, k_pos, kvl, table, m_buf, l_buf, acc,
        s, window or 0, hd**-0.5, k.shape[2] if paged else 1,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_pos.stride(0), table.stride(0),
        G=group, GP=gp, HD=hd, BN=BLOCK_N_DECODE, NSPLIT=nsplit, DIFF=diff, HAS_WINDOW=has_window,
        HAS_KVLEN=kv_len is not None, PAGED=paged, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
    )
    _combine[(n_units, b)](
        m_buf, l_buf, acc, out, w, lam_t,
        n_kv_units, lam_init, eps, out.stride(0), out.stride(2),
        G=group, GP=gp, HD=hd, NSPLIT=nsplit, DIFF=diff, num_warps=1,
    )
    return out


def diff_attention(
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
    """Triton differential attention; see `diff_attention_ref` for arguments, shapes and returns."""
    lambdas = (lambda_q1, lambda_k1, lambda_q2, lambda_k2)
    return _run(q, k, v, q_pos, k_pos, window, kv_len, True, lambdas, lambda_init, subln_weight, eps, block_table)


def attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len: Tensor | None = None,
    block_table: Tensor | None = None,
) -> Tensor:
    """Triton plain GQA attention; see `attention_ref`."""
    return _run(q, k, v, q_pos, k_pos, window, kv_len, False, None, 0.0, None, 0.0, block_table)
