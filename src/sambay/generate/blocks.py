"""Blocks of the paged shared K/V, handed to cache rows as they grow, and the memory budget they make.

A serving cache (`sambay.cache.PagedKV`) holds the full-attention K/V in a pool of fixed-size blocks;
`BlockPool` is its allocator, on the host: a free list, the blocks each row owns, and the block
table, whose changed rows the scheduler sends to the device once per step (`take_changes`). Memory thus follows the
tokens actually held: a row owns ceil(length / block_size) blocks, not ``max_length`` positions. The
other per-row state (Mamba conv/SSM states, sliding-window rings) has a constant size and stays
allocated per slot.

Blocks may be shared: a row can hold blocks another row (or a finished request) wrote, when they hold
the same tokens at the same positions (a prefix cache hit, or the prompt blocks of n samples). Each
held block has a reference count. A block the prefix cache keeps (`keep`) is not freed when its last
holder lets go: it waits, least recently released first, and is taken back only when the free list is
empty (`on_evict` tells the prefix cache that its contents are gone).

A model without a full-attention layer (Samba) has nothing to page: its pool is empty and every
request of at most ``max_length`` tokens fits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
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
        self._refs: dict[int, int] = {}  # held block → rows holding it
        self._kept: set[int] = set()  # blocks the prefix cache keeps
        self._idle: OrderedDict[int, None] = OrderedDict()  # kept blocks no row holds, first to be taken back first
        self._dirty: set[int] = set()
        self.on_evict: Callable[[int], None] = lambda block: None

    @property
    def free_blocks(self) -> int:
        """Blocks a row can be given: free ones and kept ones no row holds."""
        return len(self._free) + len(self._idle)

    def available(self, sharing: Sequence[int] = ()) -> int:
        """Blocks a row could be given once the kept blocks in ``sharing`` are held (they stop being spare)."""
        return self.free_blocks - sum(block in self._idle for block in sharing)

    def owned(self, slot: int) -> list[int]:
        """The blocks of ``slot``, in position order."""
        return self._owned.get(slot, [])

    def needed(self, slot: int, tokens: int) -> int:
        """Blocks ``slot`` still lacks to hold ``tokens`` positions (0 without paging)."""
        if not self.paged:
            return 0
        return max(0, blocks_for(tokens, self.block_size) - len(self._owned.get(slot, ())))

    def grow(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` blocks for ``tokens`` positions; False (and nothing taken) if too few are free."""
        need = self.needed(slot, tokens)
        if need > self.free_blocks:
            return False
        self._hold(slot, [self._take() for _ in range(need)])
        return True

    def share(self, slot: int, blocks: Sequence[int]) -> None:
        """Let ``slot`` (holding nothing yet) hold ``blocks`` as its first positions, with their other holders."""
        assert not self._owned.get(slot), "shared blocks come first"
        for block in blocks:
            self._idle.pop(block, None)
        self._hold(slot, list(blocks))

    def keep(self, block: int) -> None:
        """Keep ``block``'s contents after its last holder lets go (until the space is needed)."""
        self._kept.add(block)

    def release(self, slot: int) -> None:
        """Let go of every block of ``slot``; its table row points at the null block again."""
        owned = self._owned.pop(slot, [])
        for block in reversed(owned):  # the tail of a sequence is the first to be taken back
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            del self._refs[block]
            if block in self._kept:
                self._idle[block] = None
            else:
                self._free.append(block)
        if owned:
            self._table[slot] = 0
            self._dirty.add(slot)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)
        self._kept.discard(block)
        self.on_evict(block)
        return block

    def _hold(self, slot: int, blocks: list[int]) -> None:
        owned = self._owned.setdefault(slot, [])
        for block in blocks:
            self._table[slot, len(owned)] = block
            owned.append(block)
            self._refs[block] = self._refs.get(block, 0) + 1
        if blocks:
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
