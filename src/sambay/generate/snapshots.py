"""The device side of prefix caching: a pool of snapshots of a row's per-row state.

A snapshot is a copy of everything `SambaYCache.row_tensors` holds for one row (the Mamba conv and SSM
states, the sliding-window rings) at a block boundary; the shared K/V of the positions before it stays
in the paged pool, in blocks the prefix cache keeps (`sambay.generate.prefix_cache`). Saving and
restoring are batched index copies, in the model's stream order, so a restore planned after a save
always sees it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sambay.cache import SambaYCache


class SnapshotPool:
    """``entries`` snapshots of one row of ``cache`` each (allocated once, on the cache's device)."""

    def __init__(self, cache: SambaYCache, entries: int):
        self.cache, self.entries = cache, entries
        self.tensors = [torch.zeros((entries, *t.shape[1:]), dtype=t.dtype, device=t.device)
                        for t in (cache.row_tensors() if entries else ())]

    @property
    def entry_bytes(self) -> int:
        """Bytes of one snapshot."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.entries * self.entry_bytes

    def save(self, slots: Tensor, entries: Tensor) -> None:
        """Copy the state of cache rows ``slots`` into snapshot ``entries`` ((k,) int64 each, on the device)."""
        for row, snap in zip(self.cache.row_tensors(), self.tensors, strict=True):
            snap[entries] = row[slots]

    def restore(self, entries: Tensor, slots: Tensor, lengths: Tensor) -> None:
        """Make cache rows ``slots`` hold snapshots ``entries``, of ``lengths`` tokens ((k,) int64 each)."""
        for row, snap in zip(self.cache.row_tensors(), self.tensors, strict=True):
            row[slots] = snap[entries]
        self.cache.seqlens[slots] = lengths
