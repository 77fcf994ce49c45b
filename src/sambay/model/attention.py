"""Attention mixers of SambaY: sliding-window and full self-attention, and cross-attention over the shared KV.

Spec §3.6. Projections: one fused QKV linear (with bias) for self-attention, a Q-only linear for
cross-attention, an output linear with bias; no position encoding in the release (NoPE); RoPE when the
config asks for it (Transformer++ baselines), applied before K is cached.

The attention *core* is chosen at construction: `DifferentialCore` (the release: λ, even/odd head
pairing, sub-layer RMSNorm) or `PlainCore` (softmax attention). Both take positions, not masks; see
`sambay.ops.attention`.

Caches: `SlidingWindowAttention` keeps a ring buffer of the last `window` K/V; `FullAttention` writes
every K/V into a static buffer (or a block pool, `PagedKV`) and hands it on as the `SharedKV` that
every `CrossAttention` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sambay.cache import FullKV, PagedKV, SlidingKV, ring_positions
from sambay.config import SambaYConfig
from sambay.model.span import Span
from sambay.ops import Ops


@dataclass
class SharedKV:
    """The K/V of the full-attention layer as the cross-decoder sees them."""

    k: Tensor  # (b, n_kv_heads, s, head_dim)
    v: Tensor  # (b, n_kv_heads, s, head_dim)
    k_pos: Tensor  # (b, s) int64 absolute positions; negative = not yet written for that row
    kv_len: Tensor | None = None  # (b,) keys at index >= kv_len are never visible (a hint for kernels)
    block_table: Tensor | None = None  # (b, max_blocks): k and v are block pools (`sambay.cache.PagedKV`)


def lambda_init(layer_index: int) -> float:
    """λ_init of differential attention at a depth (0-based layer index): 0.8 - 0.6 exp(-0.3 · index)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DifferentialCore(nn.Module):
    """λ-weighted difference of two softmax attentions with the release's head pairing."""

    def __init__(self, head_dim: int, layer_index: int, eps: float, ops: Ops):
        super().__init__()
        self.lambda_q1 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_k1 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_q2 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_k2 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.subln = nn.RMSNorm(2 * head_dim, eps=eps)  # its weight only; the op applies it
        self.lambda_init, self.eps, self.ops = lambda_init(layer_index), eps, ops

    def fp32_parameters(self) -> list[nn.Parameter]:
        """The λ vectors stay fp32 whatever the model dtype (the checkpoint stores them as F32)."""
        return [self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2]

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len=None,
        block_table=None,
    ) -> Tensor:
        return self.ops.diff_attention(
            q, k, v, q_pos, k_pos, window, self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2,
            self.lambda_init, self.subln.weight, self.eps, kv_len, block_table,
        )


class PlainCore(nn.Module):
    """Softmax attention with GQA (no parameters)."""

    def __init__(self, ops: Ops):
        super().__init__()
        self.ops = ops

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int | None, kv_len=None,
        block_table=None,
    ) -> Tensor:
        return self.ops.attention(q, k, v, q_pos, k_pos, window, kv_len, block_table)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al., arXiv 2104.09864), half-split layout, fp32 angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: (b, h, t, head_dim); pos: (b, t). Returns x rotated, same dtype."""
        half = self.head_dim // 2
        inv_freq = self.theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
        angle = pos.float().unsqueeze(-1) * inv_freq  # (b, t, half)
        cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)  # (b, 1, t, half)
        x1, x2 = x.float().split(half, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class NoRotary(nn.Module):
    """NoPE: attention sees no position encoding (the release)."""

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        return x


def _build_core(config: SambaYConfig, layer_index: int, ops: Ops) -> nn.Module:
    if config.differential:
        return DifferentialCore(config.head_dim, layer_index, config.norm_eps, ops)
    return PlainCore(ops)


def _build_rotary(config: SambaYConfig) -> nn.Module:
    return NoRotary() if config.rope_theta is None else Rotary(config.head_dim, config.rope_theta)


class _SelfAttention(nn.Module):
    """Fused-QKV projection shared by the sliding-window and full attention layers."""

    window: int | None

    def __init__(self, config: SambaYConfig, layer_index: int, ops: Ops):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.qkv = nn.Linear(config.d_model, q_width + 2 * kv_width, bias=config.qkv_bias)
        self.out_proj = nn.Linear(q_width, config.d_model, bias=config.out_bias)
        self.core = _build_core(config, layer_index, ops)
        self.rotary = _build_rotary(config)

    def _project(self, h: Tensor, span: Span) -> tuple[Tensor, Tensor, Tensor]:
        """h: (b, t, d_model) → q (b, n_heads, t, hd), k and v (b, n_kv_heads, t, hd)."""
        b, t, _ = h.shape
        q, k, v = self.qkv(h).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1
        )
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.rotary(q, span.q_pos), self.rotary(k, span.q_pos), v

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, kv_len: Tensor | None = None,
        block_table: Tensor | None = None,
    ) -> Tensor:
        out = self.core(q, k, v, q_pos, k_pos, self.window, kv_len, block_table)  # (b, t, n_heads, head_dim)
        return self.out_proj(out.flatten(2))


def _valid_cells(span: Span, keep_last: int | None = None) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the new tokens to cache; only each row's last ``keep_last`` when given."""
    t = span.q_pos.shape[1]
    col = torch.arange(t, device=span.q_pos.device).view(1, -1)
    n = torch.full_like(span.start, t) if span.lengths is None else span.lengths
    keep = col < n.view(-1, 1)
    if keep_last is not None:
        keep &= col >= (n - keep_last).view(-1, 1)
    return keep.nonzero(as_tuple=True)


class SlidingWindowAttention(_SelfAttention):
    """Self-attention over the last `window` positions, itself included (SWA layers of the self-decoder)."""

    def __init__(self, config: SambaYConfig, layer_index: int, ops: Ops):
        super().__init__(config, layer_index, ops)
        self.window = config.window

    def forward(self, h: Tensor, span: Span, cache: SlidingKV | None) -> tuple[Tensor, None]:
        """h: (b, t, d_model) → ((b, t, d_model), None); writes the newest K/V into the ring buffer."""
        q, k, v = self._project(h, span)
        if cache is None:
            return self._attend(q, k, v, span.q_pos, span.q_pos), None
        size = cache.k.shape[2]
        if span.is_decode:  # static shapes, no host sync: write the slot, attend over the ring
            rows = torch.arange(h.shape[0], device=h.device) if cache.rows is None else cache.rows
            slot = span.start % size
            cache.k[rows, :, slot] = k[:, :, 0]
            cache.v[rows, :, slot] = v[:, :, 0]
            k_pos, kv_len = span.decode_ring(size)  # (b, size), (b,); slot j holds a position >= j
            # a view's rings are read in place: the ring buffers as a pool of one-block rows
            table = None if cache.rows is None else cache.rows.view(-1, 1).to(torch.int32)
            return self._attend(q, cache.k, cache.v, span.q_pos, k_pos, kv_len, table), None
        k_all = torch.cat([cache.k, k], dim=2)  # (b, n_kv_heads, size + t, hd): ring, then the new keys
        v_all = torch.cat([cache.v, v], dim=2)
        k_pos = torch.cat([ring_positions(span.start, size), span.q_pos], dim=1)  # (b, size + t)
        rows, cols = _valid_cells(span, keep_last=size)  # a chunk longer than the ring keeps its tail
        slots = span.q_pos[rows, cols] % size
        cache.k[rows, :, slots] = k[rows, :, cols]
        cache.v[rows, :, slots] = v[rows, :, cols]
        return self._attend(q, k_all, v_all, span.q_pos, k_pos), None


class FullAttention(_SelfAttention):
    """Causal self-attention over the whole context; hands its K/V on as the shared KV.

    Prefill attends over [keys already cached | this call's keys], the layout the fast kernels expect
    (the last t keys belong to the t queries, in order); decode attends over the static cache buffer.
    """

    window = None

    def forward(self, h: Tensor, span: Span, cache: FullKV | PagedKV | None) -> tuple[Tensor, SharedKV]:
        """h: (b, t, d_model) → ((b, t, d_model), SharedKV); appends the new K/V to the cache."""
        q, k, v = self._project(h, span)
        if cache is None:
            shared = SharedKV(k=k, v=v, k_pos=span.q_pos)
        elif span.is_decode:  # static shapes, no host sync
            shared = self._decode(k, v, span, cache)
        else:
            shared = self._prefill(k, v, span, cache)
        out = self._attend(q, shared.k, shared.v, span.q_pos, shared.k_pos, shared.kv_len, shared.block_table)
        return out, shared

    @staticmethod
    def _decode(k: Tensor, v: Tensor, span: Span, cache: FullKV | PagedKV) -> SharedKV:
        """Write the step's K/V at each row's position; share the whole buffer, visible up to ``kv_len``.
        A paged cache's idle table entries point at the null block, so padding rows write nowhere that matters."""
        rows = torch.arange(k.shape[0], device=k.device)
        end = span.start + 1
        cache.write(rows, span.start, k[:, :, 0], v[:, :, 0])
        idx = torch.arange(cache.capacity, device=k.device).view(1, -1)
        k_pos = torch.where(idx < end.view(-1, 1), idx, -1)  # (b, capacity); index j holds position j
        return SharedKV(k=cache.k, v=cache.v, k_pos=k_pos, kv_len=end, block_table=cache.block_table)

    @staticmethod
    def _prefill(k: Tensor, v: Tensor, span: Span, cache: FullKV | PagedKV) -> SharedKV:
        """[keys already cached | this call's keys] for attention; the valid new K/V go into the cache."""
        before = int(span.start.max())
        k_old, v_old = cache.gather(before)
        idx = torch.arange(before, device=k.device).view(1, -1)
        k_pos = torch.cat([torch.where(idx < span.start.view(-1, 1), idx, -1), span.q_pos], dim=1)
        shared = SharedKV(k=torch.cat([k_old, k], dim=2), v=torch.cat([v_old, v], dim=2), k_pos=k_pos)
        rows, cols = _valid_cells(span)
        cache.write(rows, span.q_pos[rows, cols], k[rows, :, cols], v[rows, :, cols])
        return shared


class CrossAttention(nn.Module):
    """Queries from this layer, keys and values from the shared KV (cross-decoder; caches nothing)."""

    def __init__(self, config: SambaYConfig, layer_index: int, ops: Ops):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.out_bias)
        self.core = _build_core(config, layer_index, ops)
        self.rotary = _build_rotary(config)

    def forward(self, h: Tensor, span: Span, memory: Tensor | None, shared: SharedKV) -> tuple[Tensor, None]:
        """h: (b, t, d_model) → ((b, t, d_model), None)."""
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (b, n_heads, t, hd)
        q = self.rotary(q, span.q_pos)
        out = self.core(q, shared.k, shared.v, span.q_pos, shared.k_pos, None, shared.kv_len, shared.block_table)
        return self.out_proj(out.flatten(2)), None
