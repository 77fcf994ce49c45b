"""Typed inference caches for the SambaY hybrid state, allocated once with static shapes.

Per sequence the released model caches (spec §4.1, §6.2):
    9 × MambaState   conv inputs (d_inner, d_conv - 1) + SSM state (d_inner, d_state)   constant size
    8 × SlidingKV    K/V ring buffers of `window` slots                                   capped
    1 × FullKV       the shared K/V of the full-attention layer, (max_length) slots        grows
The cross-decoder caches nothing: its attention layers read the shared FullKV.

The growing K/V comes in two layouts. `FullKV` reserves ``max_length`` positions per row (one
sequence per row, as `Engine` and the benchmarks use it). `PagedKV` (a serving cache) holds a pool of
fixed-size blocks; row r's position p lives in block ``block_table[r, p // block_size]`` at offset
``p % block_size`` (vLLM's PagedAttention, Kwon et al., arXiv 2309.06180), so memory follows the
tokens actually held: whoever owns the cache (the scheduler) hands blocks out as rows grow. Block 0
is the null block: unassigned table entries point at it, so the static decode step of an idle row
writes there and never into a block another row owns.

Layers receive only their own slice. The model reads `seqlens` and never changes it: whoever runs the
forward (the engine's `prefill` / `decode_step`, the model runner) calls `advance` once per forward.

A scheduler decodes a few of its slots at a time: `SambaYCache.view` makes a cache whose batch row i
is slot ``rows[i]`` of the full cache, sharing its storage (the Mamba and sliding-window states carry
that index, the ops read and write those rows in place, the paged K/V gets the rows' block table), so
idle slots cost nothing and no state is copied.
Dtypes: K/V and conv inputs in the model dtype (as the reference); the SSM state in fp32, a deliberate
deviation from the reference's bf16 state: it accumulates over every step of the sequence.

Ring buffers store the key of position p in slot p % size. Attention has no position encoding of its
own (NoPE) or applies RoPE before caching, so slot order never matters; `ring_positions` recovers the
position held by each slot from `seqlens` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class MambaState:
    """State of one MAMBA layer."""

    conv: Tensor  # (b, d_inner, d_conv - 1) last conv inputs, oldest first
    ssm: Tensor  # (b, d_inner, d_state) fp32
    rows: Tensor | None = None  # (b,) int64: batch row i's state is row rows[i] of conv/ssm (`SambaYCache.view`)


@dataclass
class SlidingKV:
    """Ring buffer of one SLIDING_ATTENTION layer."""

    k: Tensor  # (b, n_kv_heads, size, head_dim), size = min(window, max_length)
    v: Tensor
    rows: Tensor | None = None  # (b,) int64: batch row i's ring is row rows[i] of k/v (`SambaYCache.view`)


def _tensors(state) -> list[Tensor]:
    """The state tensors of one layer's cache (not its view index)."""
    return [getattr(state, f.name) for f in fields(state) if f.name != "rows"]


@dataclass
class FullKV:
    """K/V of one FULL_ATTENTION layer; the last self-decoder one is the shared KV of the cross-decoder."""

    k: Tensor  # (b, n_kv_heads, max_length, head_dim)
    v: Tensor

    block_table = None  # not paged: row r's position p is at k[r, :, p]

    @property
    def capacity(self) -> int:
        """Positions each row can address."""
        return self.k.shape[2]

    def gather(self, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` positions of every row, (b, n_kv_heads, length, head_dim) K and V (views)."""
        return self.k[:, :, :length], self.v[:, :, :length]

    def write(self, rows: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k[i], v[i] ((n_kv_heads, head_dim) each, stacked on dim 0) at position pos[i] of row rows[i]."""
        self.k[rows, :, pos] = k
        self.v[rows, :, pos] = v


@dataclass
class PagedKV:
    """K/V of one FULL_ATTENTION layer in blocks (module docstring); block 0 is the null block."""

    k: Tensor  # (n_blocks, n_kv_heads, block_size, head_dim)
    v: Tensor
    block_table: Tensor  # (b, max_blocks) int32 block of each row's positions; one tensor for every layer

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        """Positions each row can address through its table."""
        return self.block_table.shape[1] * self.block_size

    def gather(self, length: int) -> tuple[Tensor, Tensor]:
        """The first ``length`` positions of every row as contiguous (b, n_kv_heads, length, head_dim) K, V."""
        table = self.block_table[:, : -(-length // self.block_size)]
        return blocks_to_rows(self.k, table)[:, :, :length], blocks_to_rows(self.v, table)[:, :, :length]

    def write(self, rows: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k[i], v[i] ((n_kv_heads, head_dim) each, stacked on dim 0) at position pos[i] of row rows[i]."""
        block = self.block_table[rows, pos // self.block_size].long()
        offset = pos % self.block_size
        self.k[block, :, offset] = k
        self.v[block, :, offset] = v


@dataclass
class SambaYCache:
    """All per-sequence state of a SambaY model. Slices are indexed by position among layers of a kind."""

    mamba: list[MambaState]
    sliding: list[SlidingKV]
    full: list[FullKV] | list[PagedKV]
    seqlens: Tensor  # (b,) int64 tokens already consumed, per row
    max_length: int

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def paged(self) -> bool:
        return bool(self.full) and isinstance(self.full[0], PagedKV)

    def advance(self, tokens: Tensor | int) -> None:
        """Count ``tokens`` more tokens in every row (an int, or (b,) per row) after a forward wrote them."""
        self.seqlens += tokens

    def row_tensors(self) -> list[Tensor]:
        """State tensors indexed by row first: all of them except the block pools and tables."""
        full = [] if self.paged else self.full
        return [t for group in (self.mamba, self.sliding, full) for s in group for t in _tensors(s)]

    def view(self, rows: Tensor, seqlens: Tensor, block_table: Tensor | None) -> SambaYCache:
        """A cache whose batch row i is row ``rows[i]`` of this one, sharing its storage (decode only).

        Args:
            rows: (b,) int64 rows of this cache; a row may repeat (padding rows of a batch bucket).
            seqlens: (b,) int64 lengths of those rows, which a forward over the view reads (the owner
                advances this cache's `seqlens` of those rows).
            block_table: (b, max_blocks) int32 the rows' block tables (paged caches), else None.
        """
        if self.full and not self.paged:
            raise ValueError("a cache view needs a paged shared K/V (new_cache(block_size=...))")
        full = [PagedKV(k=s.k, v=s.v, block_table=block_table) for s in self.full]
        return SambaYCache(mamba=[MambaState(s.conv, s.ssm, rows) for s in self.mamba],
                           sliding=[SlidingKV(s.k, s.v, rows) for s in self.sliding],
                           full=full, seqlens=seqlens, max_length=self.max_length)

    def tensors(self) -> list[Tensor]:
        """Every state tensor (not `seqlens` nor the block table)."""
        pools = [t for s in self.full for t in (s.k, s.v)] if self.paged else []
        return self.row_tensors() + pools

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all rows)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every sequence: zero all state and lengths."""
        for t in self.tensors():
            t.zero_()
        self.seqlens.zero_()
        if self.paged:
            self.full[0].block_table.zero_()

    def select(self, rows: Tensor) -> SambaYCache:
        """A cache of ``rows`` only, for a forward over a few rows of a large cache: the per-row state is
        copied out (write it back with `update_rows`); a paged K/V shares its pools, so its writes land
        in place."""
        def take(state):
            if isinstance(state, PagedKV):
                return PagedKV(k=state.k, v=state.v, block_table=table)
            return type(state)(*[t[rows] for t in _tensors(state)])

        table = self.full[0].block_table[rows] if self.paged else None
        return SambaYCache(mamba=[take(s) for s in self.mamba], sliding=[take(s) for s in self.sliding],
                           full=[take(s) for s in self.full], seqlens=self.seqlens[rows], max_length=self.max_length)

    def update_rows(self, rows: Tensor, part: SambaYCache) -> None:
        """Write back the state of a `select`-ed cache after a forward over it."""
        for t, p in zip((*self.row_tensors(), self.seqlens), (*part.row_tensors(), part.seqlens), strict=True):
            t[rows] = p

    def copy_rows(self, src: Tensor | list[int], dst: Tensor | list[int]) -> None:
        """Copy the state of rows ``src`` into rows ``dst`` (n-sample fan-out after one prefill).

        Paged: the caller must first give each ``dst`` row blocks for ``seqlens[src]`` positions; the
        contents of the source blocks are copied into them (reads ``seqlens`` on the host)."""
        src = torch.as_tensor(src, dtype=torch.long, device=self.seqlens.device)
        dst = torch.as_tensor(dst, dtype=torch.long, device=self.seqlens.device)
        if src.shape != dst.shape or src.ndim != 1:
            raise ValueError(f"src and dst must be 1-D index lists of equal length, got {src.shape}, {dst.shape}")
        for idx in (src, dst):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
                raise ValueError(f"row index out of range for a cache of {self.batch_size} rows: {idx.tolist()}")
        for t in (*self.row_tensors(), self.seqlens):
            t[dst] = t[src]
        if self.paged and src.numel():
            n = -(-int(self.seqlens[src].max()) // self.full[0].block_size)
            from_blocks = self.full[0].block_table[src, :n].long().flatten()
            to_blocks = self.full[0].block_table[dst, :n].long().flatten()
            for state in self.full:
                state.k[to_blocks] = state.k[from_blocks]
                state.v[to_blocks] = state.v[from_blocks]


def blocks_to_rows(pool: Tensor, table: Tensor) -> Tensor:
    """Rows of a block pool in position order: (n_blocks, h, block_size, d) pool, (b, n) block ids →
    (b, h, n * block_size, d)."""
    blocks = pool[table.long()]  # (b, n, h, block_size, d)
    b, n, h, size, d = blocks.shape
    return blocks.transpose(1, 2).reshape(b, h, n * size, d)


def ring_positions(seqlens: Tensor, size: int) -> Tensor:
    """Position held by each ring slot: (b,) lengths → (b, size) int64, -1 for a slot never written.

    Slot s holds the largest position p < seqlen with p ≡ s (mod size).
    """
    last = seqlens.view(-1, 1).to(torch.long) - 1  # (b, 1)
    slots = torch.arange(size, device=seqlens.device).view(1, -1)
    pos = last - torch.remainder(last - slots, size)
    return torch.where(pos >= 0, pos, -1)


def allocate_cache(
    *,
    n_mamba: int,
    n_sliding: int,
    n_full: int,
    batch_size: int,
    max_length: int,
    d_inner: int,
    d_state: int,
    d_conv: int,
    n_kv_heads: int,
    head_dim: int,
    window: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    block_size: int | None = None,
    kv_blocks: int | None = None,
) -> SambaYCache:
    """Allocate a zeroed cache with static shapes (usable by torch.compile and CUDA graphs).

    With ``block_size``, the full-attention K/V is paged: a pool of ``kv_blocks`` blocks (default: enough
    for every row at ``max_length``) plus the null block, and an all-null block table.
    """
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if block_size is None and kv_blocks is not None:
        raise ValueError("kv_blocks needs a block_size")
    ring = min(window, max_length)

    def kv(slots: int) -> Tensor:
        return torch.zeros(batch_size, n_kv_heads, slots, head_dim, dtype=dtype, device=device)

    return SambaYCache(
        mamba=[
            MambaState(
                conv=torch.zeros(batch_size, d_inner, d_conv - 1, dtype=dtype, device=device),
                ssm=torch.zeros(batch_size, d_inner, d_state, dtype=torch.float32, device=device),
            )
            for _ in range(n_mamba)
        ],
        sliding=[SlidingKV(k=kv(ring), v=kv(ring)) for _ in range(n_sliding)],
        full=_full_kv(n_full, batch_size, max_length, n_kv_heads, head_dim, dtype, device, block_size, kv_blocks),
        seqlens=torch.zeros(batch_size, dtype=torch.long, device=device),
        max_length=max_length,
    )


def _full_kv(n_full, batch_size, max_length, n_kv_heads, head_dim, dtype, device, block_size, kv_blocks):
    if block_size is None:
        shape = (batch_size, n_kv_heads, max_length, head_dim)
        return [FullKV(k=torch.zeros(shape, dtype=dtype, device=device),
                       v=torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_full)]
    per_row = -(-max_length // block_size)
    kv_blocks = batch_size * per_row if kv_blocks is None else kv_blocks
    if kv_blocks < 1:
        raise ValueError(f"kv_blocks must be >= 1, got {kv_blocks}")
    table = torch.zeros(batch_size, per_row, dtype=torch.int32, device=device)
    shape = (kv_blocks + 1, n_kv_heads, block_size, head_dim)  # + the null block
    return [PagedKV(k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device),
                    block_table=table) for _ in range(n_full)]
