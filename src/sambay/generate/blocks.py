"""Blocks of the paged shared K/V, handed to cache rows as they grow, and the memory budget they make.

A serving cache (`sambay.cache.PagedKV`) holds the full-attention K/V in a pool of fixed-size blocks;
`BlockPool` is its allocator, on the host: a free list, the blocks each row owns, and the block
table, whose changed rows the scheduler sends to the device once per step (`take_changes`). Memory thus follows the
tokens actually held: a row owns ceil(length / block_size) blocks, not ``max_length`` positions. The
other per-row state (Mamba conv/SSM states, sliding-window rings) has a constant size and stays
allocated per slot.

A model without a full-attention layer (Samba) has nothing to page: its pool is empty and every
request of at most ``max_length`` tokens fits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sambay.cache import SambaYCache
from sambay.model.sambay import SambaY


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` positions."""
    return -(-tokens // block_size)


class BlockPool:
    """The block allocator of one paged cache (block 0, the null block, is never handed out)."""

    def __init__(self, cache: SambaYCache):
        self.paged = cache.paged
        if self.paged:
            full = cache.full[0]
            self.block_size, self.capacity = full.block_size, full.k.shape[0] - 1
            width = full.block_table.shape[1]
        else:
            self.block_size, self.capacity, width = cache.max_length, 0, 1
        self._table = torch.zeros(cache.batch_size, width, dtype=torch.int32)  # (slots, max_blocks) on the host
        self._free = list(range(self.capacity, 0, -1))  # a stack: low ids are handed out first
        self._owned: dict[int, list[int]] = {}
        self._dirty: set[int] = set()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def needed(self, slot: int, tokens: int) -> int:
        """Blocks ``slot`` still lacks to hold ``tokens`` positions (0 without paging)."""
        if not self.paged:
            return 0
        return max(0, blocks_for(tokens, self.block_size) - len(self._owned.get(slot, ())))

    def grow(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` blocks for ``tokens`` positions; False (and nothing taken) if too few are free."""
        need = self.needed(slot, tokens)
        if need > len(self._free):
            return False
        owned = self._owned.setdefault(slot, [])
        for _ in range(need):
            self._table[slot, len(owned)] = block = self._free.pop()
            owned.append(block)
        if need:
            self._dirty.add(slot)
        return True

    def release(self, slot: int) -> None:
        """Return every block of ``slot``; its table row points at the null block again."""
        owned = self._owned.pop(slot, [])
        if owned:
            self._free.extend(reversed(owned))
            self._table[slot] = 0
            self._dirty.add(slot)

    def take_changes(self) -> tuple[list[int], torch.Tensor] | None:
        """The rows of the block table changed since the last call, and their contents (None: no change)."""
        if not (self._dirty and self.paged):
            return None
        rows, self._dirty = sorted(self._dirty), set()
        return rows, self._table[rows]


@dataclass(frozen=True)
class MemoryBudget:
    """What the serving cache holds, decided at start."""

    slots: int  # concurrent sequences
    max_length: int  # tokens per sequence
    bytes_per_slot: int  # Mamba + sliding-window states: constant per sequence
    block_size: int  # tokens per block of the shared K/V
    kv_blocks: int  # blocks in the pool (0 for a model without full attention)
    bytes_per_block: int

    @property
    def kv_tokens(self) -> int:
        """Shared-K/V positions the pool holds, all sequences together."""
        return self.kv_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        """Every byte of the cache: the slots and the runner's spare padding row, the pool and its null block."""
        return (self.slots + 1) * self.bytes_per_slot + (self.kv_blocks + 1) * self.bytes_per_block


def memory_budget(model: SambaY, slots: int, max_length: int, block_size: int, kv_blocks: int | None) -> MemoryBudget:
    """Sizes of a paged cache (measured on the meta device: nothing is allocated).

    ``kv_blocks`` None: enough blocks for every slot at ``max_length``."""
    probe = model.new_cache(batch_size=1, max_length=max_length, device="meta", block_size=block_size, kv_blocks=1)
    per_block = sum(t.numel() * t.element_size() for s in probe.full for t in (s.k, s.v)) // 2 if probe.full else 0
    per_slot = sum(t.numel() * t.element_size() for t in probe.row_tensors())
    if not probe.full:
        kv_blocks = 0
    elif kv_blocks is None:
        kv_blocks = slots * blocks_for(max_length, block_size)
    return MemoryBudget(slots, max_length, per_slot, block_size, kv_blocks, per_block)


def kv_blocks_for_budget(
    model: SambaY, slots: int, max_length: int, block_size: int, budget_bytes: int
) -> int | None:
    """How many K/V blocks fit in ``budget_bytes`` of cache once ``slots`` sequences' constant state is paid
    (None for a model without full attention, which has nothing to page).

    Raises:
        ValueError: the budget does not even hold the slots' constant state and one block.
    """
    unit = memory_budget(model, slots, max_length, block_size, 1)
    if unit.bytes_per_block == 0:
        return None
    blocks = (budget_bytes - (slots + 1) * unit.bytes_per_slot) // unit.bytes_per_block - 1  # - the null block
    if blocks < 1:
        raise ValueError(f"a cache budget of {budget_bytes / 1e9:.2f} GB does not hold {slots} sequences' "
                         f"constant state ({slots * unit.bytes_per_slot / 1e9:.2f} GB) and any K/V block: "
                         "give more memory or fewer slots")
    return blocks
