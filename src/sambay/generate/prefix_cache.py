"""Prefix caching for the hybrid state: shared K/V blocks plus snapshots of the per-row state.

A transformer's prefix cache keeps K/V blocks: a prompt that starts with cached blocks maps them and
prefills the rest. SambaY's cache is not all blocks: the Mamba conv and SSM states and the sliding-window
rings describe the sequence *at its end* and cannot be cut at an earlier position. So besides the
shared K/V blocks of the full-attention layer this cache keeps **snapshots**: copies of a row's whole
per-row state (`SambaYCache.row_tensors`) at a block boundary, in a pool of fixed entries on the device
(`sambay.generate.snapshots`). A request is served from the longest boundary that has a snapshot and
whose blocks are all still cached: the runner copies the snapshot into the request's row, the row's
block table maps the shared blocks, and only the tokens after the boundary are prefilled.

Which boundaries get a snapshot (vLLM's ``--mamba-cache-mode align`` makes the same choice):
- **the last block boundary before a prompt's final token** (``(len - 1) // block_size`` blocks): the
  next turn of a conversation, a request for more samples of the same prompt, or the same system prompt
  with another question starts from there. The prompt's last chunk is split at that boundary (the
  runner runs the two parts one after the other in the same step, saving the state between them), and
  at least one token always remains to prefill, because the request needs its logits;
- **every block-aligned chunk end inside a long prompt** (chunks are ``prefill_chunk`` or
  ``prefill_budget`` tokens, multiples of the block size by default): two long prompts that share a
  document and diverge inside it resume from the last chunk end before the divergence.
Snapshots anywhere else would need the state at positions no forward stops at.

Keys are a hash chain over full blocks (each block's key hashes its parent's key and its tokens), so a
key names a whole prefix; the chain starts from the request's LoRA adapter (`chain_seed`), so rows of
different adapters, whose states differ for the same tokens, never share a block or a snapshot; every
hit is verified against the stored tokens (and the chain's start), so a hash collision can never serve
another prefix's state. K/V blocks are reference-counted by the `BlockPool`; cached blocks no row
holds are taken back least recently released first (a sequence's tail first) when the pool runs out,
and snapshots are evicted least recently used when their pool is full. A snapshot whose blocks were
taken back is unreachable until the same prefix is cached again.

Counters (in tokens, for ``/metrics``): ``queries`` (prompt tokens looked up) and ``hits`` (tokens
served from the cache).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sambay.generate.blocks import BlockPool


@dataclass(frozen=True)
class Hit:
    """The longest cached prefix of a prompt: ``length`` tokens, their ``blocks``, the snapshot ``entry``."""

    length: int
    blocks: tuple[int, ...]
    entry: int


def chain_seed(adapter: int) -> int:
    """The parent key of a prompt's first block: 0 for the base model, a per-adapter value otherwise."""
    return 0 if adapter == 0 else hash(("lora adapter", adapter))


def chain_keys(tokens: list[int], block_size: int, n_blocks: int, seed: int = 0) -> list[int]:
    """The keys of the first ``n_blocks`` full blocks of ``tokens``: key j names tokens[: (j + 1) * block_size]
    run with the adapter whose `chain_seed` is ``seed``."""
    keys, key = [], seed
    for j in range(n_blocks):
        key = hash((key, tuple(tokens[j * block_size : (j + 1) * block_size])))
        keys.append(key)
    return keys


class PrefixCache:
    """Which prefixes are cached: block keys → K/V blocks, boundary keys → snapshot entries (module docstring).

    Args:
        blocks: the allocator of the runner's paged K/V (its kept blocks are this cache's blocks).
        entries: snapshot entries in the runner's pool (0 turns the cache off).
    """

    def __init__(self, blocks: BlockPool, entries: int):
        self.blocks, self.block_size, self.entries = blocks, blocks.block_size, entries
        self._block_of: dict[int, int] = {}  # key → block
        self._key_of: dict[int, int] = {}  # block → key
        self._content: dict[int, tuple[int, tuple[int, ...]]] = {}  # key → (parent key, tokens): verification
        self._snapshots: OrderedDict[int, int] = OrderedDict()  # boundary key → entry, least recently used first
        self._spare = list(range(entries - 1, -1, -1))
        self.queries = self.hits = 0
        blocks.on_evict = self._forget_block

    @property
    def enabled(self) -> bool:
        return self.entries > 0 and self.blocks.paged

    @property
    def snapshots(self) -> int:
        """Snapshot entries in use."""
        return len(self._snapshots)

    def lookup(self, tokens: list[int], keys: list[int], seed: int = 0) -> Hit | None:
        """The longest cached prefix of ``tokens`` (``keys``: their `chain_keys` from ``seed``) leaving a token
        to prefill."""
        best, blocks, parent = None, [], seed
        for j, key in enumerate(keys[: (len(tokens) - 1) // self.block_size]):
            block = self._block_of.get(key)
            if block is None or self._content[key] != (parent, tuple(self._span(tokens, j))):
                break
            blocks.append(block)
            parent = key
            if key in self._snapshots:
                best = j + 1
        if best is None:
            return None
        entry = self._snapshots[keys[best - 1]]
        self._snapshots.move_to_end(keys[best - 1])
        return Hit(best * self.block_size, tuple(blocks[:best]), entry)

    def count(self, tokens: int, hit: Hit | None) -> None:
        """Account for a prompt of ``tokens`` tokens admitted with ``hit``."""
        self.queries += tokens
        self.hits += hit.length if hit else 0

    def snapshot(self, tokens: list[int], keys: list[int], boundary: int, row_blocks: list[int],
                 seed: int = 0) -> int | None:
        """Cache the prefix ``tokens[:boundary]`` of a row holding ``row_blocks`` (``keys`` chained from ``seed``):
        its blocks are kept, and the snapshot entry its state is to be saved into is returned (None: already
        cached, or no entry)."""
        n = boundary // self.block_size
        for j in range(n):
            self._keep(keys[j], keys[j - 1] if j else seed, self._span(tokens, j), row_blocks[j])
        key = keys[n - 1]
        if key in self._snapshots or not self.entries:
            return None
        if self._spare:
            entry = self._spare.pop()
        else:
            _, entry = self._snapshots.popitem(last=False)
        self._snapshots[key] = entry
        return entry

    def _span(self, tokens: list[int], j: int) -> list[int]:
        return tokens[j * self.block_size : (j + 1) * self.block_size]

    def _keep(self, key: int, parent: int, span: list[int], block: int) -> None:
        if key in self._block_of or block in self._key_of:
            return  # the same prefix is cached in other blocks, or this block already names one
        self._block_of[key], self._key_of[block] = block, key
        self._content[key] = (parent, tuple(span))
        self.blocks.keep(block)

    def _forget_block(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key], self._content[key]
