"""Everything a scheduler does to the model and its cache, behind one small interface.

The scheduler decides (which requests, which rows, which blocks); a runner executes: it owns the
cache and runs the forwards. Keeping the two apart lets a tensor-parallel server replay every cache
operation on every rank (`sambay.parallel.serving` broadcasts each call), and keeps device policy
(the CUDA graph of the decode step) out of the scheduling logic.

Inputs arrive as CPU tensors; outputs (logits) stay on the model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from sambay.cache import SambaYCache
from sambay.generate.cuda_graphs import GraphedDecoder
from sambay.model.sambay import SambaY

log = logging.getLogger("sambay.runner")


def reset_rows(cache: SambaYCache, rows: Sequence[int]) -> None:
    """Make cache rows fresh for a new sequence: zero their Mamba states and lengths.

    The sliding-window rings and the shared K/V need no zeroing: which entries are valid is derived
    from ``seqlens`` alone, so a row of length 0 never reads its stale keys.
    """
    index = torch.as_tensor(list(rows), dtype=torch.long, device=cache.seqlens.device)
    for state in cache.mamba:
        state.conv[index] = 0
        state.ssm[index] = 0
    cache.seqlens[index] = 0


class ModelRunner:
    """Runs the forwards of a scheduler over one cache of ``slots`` rows.

    Args:
        model: the language model, on its device.
        slots: cache rows.
        max_length: tokens per row.
        block_size: tokens per block of the paged shared K/V.
        kv_blocks: blocks in the pool (None: every row can reach ``max_length``).
        cuda_graph: on a CUDA device, replay the decode step from a CUDA graph captured at start.
    """

    def __init__(self, model: SambaY, *, slots: int, max_length: int, block_size: int, kv_blocks: int | None,
                 cuda_graph: bool = True):
        self.model = model
        self.cache = model.new_cache(batch_size=slots, max_length=max_length, block_size=block_size,
                                     kv_blocks=kv_blocks)
        self._graph = None
        if cuda_graph and self.cache.seqlens.device.type == "cuda":
            self._graph = GraphedDecoder(model, self.cache, sample=False, masked=True)
            log.info("decode step captured in a CUDA graph (%d rows)", slots)

    @property
    def device(self) -> torch.device:
        return self.cache.seqlens.device

    def reset_rows(self, rows: Sequence[int]) -> None:
        reset_rows(self.cache, rows)

    def copy_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Fan a prefilled row out (`SambaYCache.copy_rows`); the destination blocks must be assigned."""
        self.cache.copy_rows(list(src), list(dst))

    def set_block_rows(self, rows: Sequence[int], table: Tensor) -> None:
        """Write rows of the block table: table (len(rows), max_blocks) int32 on the CPU."""
        if self.cache.paged:
            index = torch.as_tensor(list(rows), device=self.device)
            self.cache.full[0].block_table[index] = table.to(self.device)

    def prefill(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(slots, t) tokens, (slots,) lengths (0 = idle row) → (slots, vocab) logits of each row's last token
        (rows of length 0: zeros).

        Only the rows with tokens are computed: their state is taken out of the cache (`SambaYCache.select`)
        and written back, so a prompt arriving alone costs its own tokens, not ``slots`` times them. Inputs
        are checked by the scheduler and the slot limit caps generation, hence ``check_inputs=False``."""
        rows = lengths.nonzero().flatten()
        if rows.numel() == lengths.numel():
            logits = self.model(tokens.to(self.device), self.cache, lengths=lengths.to(self.device),
                                check_inputs=False)
            return logits[:, -1]
        index = rows.to(self.device)
        part = self.cache.select(index)
        t = int(lengths.max())
        logits = self.model(tokens[rows, :t].to(self.device), part, lengths=lengths[rows].to(self.device),
                            check_inputs=False)
        self.cache.update_rows(index, part)
        out = torch.zeros(lengths.numel(), logits.shape[-1], dtype=logits.dtype, device=logits.device)
        out[index] = logits[:, -1]
        return out

    def decode(self, tokens: Tensor, active: Tensor) -> Tensor:
        """(slots, 1) tokens, (slots,) bool rows that advance → (slots, vocab) logits (the static decode path,
        whatever the other slots are doing; replayed from the CUDA graph when there is one)."""
        if self._graph is not None:
            self._graph.tokens.copy_(tokens, non_blocking=True)
            self._graph.active.copy_(active, non_blocking=True)
            self._graph.graph.replay()
            return self._graph.logits
        logits = self.model(tokens.to(self.device), self.cache, active=active.to(self.device), check_inputs=False)
        return logits[:, -1]
