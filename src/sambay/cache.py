"""Typed inference caches for the SambaY hybrid state, allocated once with static shapes.

Per sequence the released model caches (spec §4.1, §6.2):
    9 × MambaState   conv inputs (d_inner, d_conv - 1) + SSM state (d_inner, d_state)   constant size
    8 × SlidingKV    K/V ring buffers of `window` slots                                   capped
    1 × FullKV       the shared K/V of the full-attention layer, (max_length) slots        grows
The cross-decoder caches nothing: its attention layers read the shared FullKV.

Layers receive only their own slice. `SambaY.forward` advances `seqlens` once per call; no layer does.
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


@dataclass
class SlidingKV:
    """Ring buffer of one SLIDING_ATTENTION layer."""

    k: Tensor  # (b, n_kv_heads, size, head_dim), size = min(window, max_length)
    v: Tensor


@dataclass
class FullKV:
    """K/V of one FULL_ATTENTION layer; the last self-decoder one is the shared KV of the cross-decoder."""

    k: Tensor  # (b, n_kv_heads, max_length, head_dim)
    v: Tensor


@dataclass
class SambaYCache:
    """All per-sequence state of a SambaY model. Slices are indexed by position among layers of a kind."""

    mamba: list[MambaState]
    sliding: list[SlidingKV]
    full: list[FullKV]
    seqlens: Tensor  # (b,) int64 tokens already consumed, per row
    max_length: int

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every state tensor (not `seqlens`)."""
        return [getattr(s, f.name) for group in (self.mamba, self.sliding, self.full) for s in group
                for f in fields(s)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (all rows)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reset(self) -> None:
        """Forget every sequence: zero all state and lengths."""
        for t in self.tensors():
            t.zero_()
        self.seqlens.zero_()

    def copy_rows(self, src: Tensor | list[int], dst: Tensor | list[int]) -> None:
        """Copy the state of rows ``src`` into rows ``dst`` (n-sample fan-out after one prefill)."""
        src = torch.as_tensor(src, dtype=torch.long, device=self.seqlens.device)
        dst = torch.as_tensor(dst, dtype=torch.long, device=self.seqlens.device)
        if src.shape != dst.shape or src.ndim != 1:
            raise ValueError(f"src and dst must be 1-D index lists of equal length, got {src.shape}, {dst.shape}")
        for idx in (src, dst):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
                raise ValueError(f"row index out of range for a cache of {self.batch_size} rows: {idx.tolist()}")
        for t in (*self.tensors(), self.seqlens):
            t[dst] = t[src]


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
) -> SambaYCache:
    """Allocate a zeroed cache with static shapes (usable by torch.compile and CUDA graphs)."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
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
        full=[FullKV(k=kv(max_length), v=kv(max_length)) for _ in range(n_full)],
        seqlens=torch.zeros(batch_size, dtype=torch.long, device=device),
        max_length=max_length,
    )
