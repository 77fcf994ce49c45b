"""One engine step as data: what the scheduler decided, for the model runner to carry out.

    Scheduler.schedule() ──► StepPlan ──► ModelRunner.execute(plan) ──► logits of plan.emit rows
      (policy, host only)      (plain data)      (the only code that touches the model and cache)

A plan names cache rows (slots), never requests: the runner does not know what a request is, and a
tensor-parallel server sends the same plan to every rank (`encode` / `decode` make it one int64 tensor).
The runner applies the fields in their order here: rows start fresh (each with the LoRA adapter it runs
with, kept by the runner until the row starts again, so decode rows need no per-step adapter list),
block-table rows change, rows restore a cached prefix's state (prefix caching), prompt chunks are
prefilled (a row may have two chunks in one step: they run one after the other, and a chunk may save the
row's state into a snapshot after it), prefilled rows are fanned out to their sibling samples, then every
decoding row consumes the token last sampled into it (kept on the device by the runner, so the host never
has to read a token back before the next step is launched).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class PrefillChunk:
    """Tokens that one row consumes this step, continuing from what its cache holds."""

    slot: int
    tokens: tuple[int, ...]
    emit: bool  # the row's prefill ends here: return the logits of its last token
    save: int = -1  # snapshot entry the row's state is copied into after this chunk (-1: none)


@dataclass(frozen=True)
class StepPlan:
    """Everything one step does to the cache and model (module docstring)."""

    reset: tuple[int, ...] = ()  # rows that start a new sequence: zero state, length 0
    block_rows: tuple[int, ...] = ()  # rows of the block table that changed
    block_table: Tensor | None = None  # (len(block_rows), max_blocks) int32 on the CPU: their new contents
    restore: tuple[tuple[int, int, int], ...] = ()  # (snapshot entry, row, length): a cached prefix's state
    prefill: tuple[PrefillChunk, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()  # (src, dst): a finished prefill fanned out to n samples
    decode: tuple[int, ...] = ()  # rows that consume their last sampled token
    adapters: tuple[int, ...] = ()  # adapter slot of each ``reset`` row (0: the base model); () means all 0

    @property
    def emit(self) -> tuple[int, ...]:
        """Rows whose next-token logits `ModelRunner.execute` returns, in this order."""
        return tuple(c.slot for c in self.prefill if c.emit) + self.decode

    @property
    def is_empty(self) -> bool:
        return not (self.reset or self.block_rows or self.restore or self.prefill or self.copies or self.decode)

    @property
    def tokens(self) -> int:
        """Tokens the model consumes in this step."""
        return sum(len(c.tokens) for c in self.prefill) + len(self.decode)


@dataclass
class _Writer:
    values: list[int] = field(default_factory=list)

    def put(self, items) -> None:
        items = list(items)
        self.values.append(len(items))
        self.values.extend(int(i) for i in items)


def encode(plan: StepPlan) -> Tensor:
    """The plan as one flat int64 tensor (for a broadcast to the other ranks)."""
    w = _Writer()
    w.put(plan.reset)
    w.put(plan.adapters)
    w.put(plan.block_rows)
    width = 0 if plan.block_table is None else plan.block_table.shape[1]
    w.values.append(width)
    if width:
        w.values.extend(plan.block_table.flatten().tolist())
    w.put(v for triple in plan.restore for v in triple)
    w.values.append(len(plan.prefill))
    for chunk in plan.prefill:
        w.values += [chunk.slot, int(chunk.emit), chunk.save]
        w.put(chunk.tokens)
    w.put(v for pair in plan.copies for v in pair)
    w.put(plan.decode)
    return torch.tensor(w.values, dtype=torch.long)


def decode(data: Tensor) -> StepPlan:
    """The inverse of `encode`."""
    values, at = data.tolist(), 0

    def take() -> list[int]:
        nonlocal at
        n = values[at]
        at += n + 1
        return values[at - n : at]

    reset, adapters, block_rows = take(), take(), take()
    width = values[at]
    at += 1
    table = None
    if width:
        table = torch.tensor(values[at : at + width * len(block_rows)], dtype=torch.int32).view(-1, width)
        at += width * len(block_rows)
    flat = take()
    restore = tuple(zip(flat[::3], flat[1::3], flat[2::3], strict=True))
    n_chunks = values[at]
    at += 1
    chunks = []
    for _ in range(n_chunks):
        slot, emit, save = values[at], bool(values[at + 1]), values[at + 2]
        at += 3
        chunks.append(PrefillChunk(slot, tuple(take()), emit, save))
    flat = take()
    copies = tuple(zip(flat[::2], flat[1::2], strict=True))
    return StepPlan(tuple(reset), tuple(block_rows), table, restore, tuple(chunks), copies, tuple(take()),
                    adapters=tuple(adapters))
