"""The model runner: the one place that touches the model and its cache (`execute(plan)`).

The scheduler decides (which rows prefill which tokens, which rows decode, which blocks they own) and
writes it down as a `StepPlan`; the runner carries it out. It owns the cache of ``slots`` rows, advances
their lengths, keeps each row's last sampled token on the device (so a decode step never waits for
the host to read a token back), and runs the decode step over the running rows only:

    running rows [3, 9, 12] ─► smallest bucket ≥ 3 (4) ─► rows [3, 9, 12, pad] ─► graph of bucket 4
                                                          (a cache view: `SambaYCache.view`)

Decode cost thus follows the running batch, not the slot count: idle slots do no attention and no
state traffic, and no state is copied (the kernels read and write the running rows in place). On a
GPU each bucket's step is a CUDA graph captured at start (largest first, one shared memory pool);
padding rows point at a spare cache row (``pad``) whose table entries are the null block. Prefill
chunks run eagerly over the rows that have tokens (their state is taken out with
`SambaYCache.select` and written back). With prefix caching the runner also holds a pool of state
snapshots (`SnapshotPool`): a plan restores rows from it and saves rows into it after their chunks.

LoRA adapters served side by side (`sambay.lora.attach_adapters`): the runner owns ``adapter_index``, one
static (slots + 1,) int64 tensor bound once to every `LoRALinear` (`bind_adapter_index`), and each row's
adapter slot (``row_adapters``, set when a plan resets the row). Before each forward it writes the
forward's rows' slots into ``adapter_index[:b]`` (a device gather, inside the decode graphs too), so one
step mixes rows of several adapters and of the base model (slot 0, zeros). The layers hold one index, so
the runner built last over a model is the one whose rows' adapters they follow (a server builds one).

`warm_up` runs every kernel specialisation a request can reach (prefill of short, long and
block-aligned chunks at aligned and unaligned starts) so that the first request costs what the
hundredth does. Inputs arrive as CPU tensors or lists; outputs (logits) stay on the model's device.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from sambay.generate.cuda_graphs import compiling, raise_recompile_limit
from sambay.generate.plan import PrefillChunk, StepPlan
from sambay.generate.snapshots import SnapshotPool
from sambay.lora.layer import LoRALinear, bind_adapter_index
from sambay.model.sambay import SambaY

log = logging.getLogger("sambay.runner")


def upload(values, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host values (a list or CPU tensor) → a tensor on ``device`` without stalling the device's queue.

    A copy from pageable host memory makes CUDA wait for all work already queued on the stream; from
    page-locked memory it is truly asynchronous (PyTorch's caching host allocator keeps the buffer until
    the copy is done). Every host → device copy of a step goes through here."""
    host = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def decode_buckets(slots: int) -> tuple[int, ...]:
    """Batch sizes that get a decode graph: 1, 2, 4, 8, 16, 24, 32, 48, 64, then every 32, up to ``slots``."""
    sizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, *range(96, slots + 32, 32)]
    return tuple(sorted({s for s in sizes if s < slots} | {slots}))


class _BucketGraph:
    """The decode step of ``size`` rows, captured once: write `rows`, replay, read `logits`."""

    def __init__(self, runner: ModelRunner, size: int, pool):
        self.rows = torch.full((size,), runner.pad, dtype=torch.long, device=runner.device)  # (size,) input
        # nothing of earlier work may touch CUDA during the capture (a freed pinned buffer queries its event)
        torch.cuda.synchronize(runner.device)
        gc.collect()
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with compiling(runner.model) if runner.compile else contextlib.nullcontext():
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3 if runner.compile else 2):  # compiles this batch size's kernels, outside the capture
                    runner._decode_step(self.rows)
            torch.cuda.current_stream(runner.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with (torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"),
                  torch.inference_mode()):
                self.logits = runner._decode_step(self.rows)  # (size, vocab_size) static output


class ModelRunner:
    """Executes step plans over one cache of ``slots`` rows (module docstring).

    Args:
        model: the language model, on its device.
        slots: cache rows available to sequences (one more is allocated as the padding row).
        max_length: tokens per row.
        block_size: tokens per block of the paged shared K/V.
        kv_blocks: blocks in the pool (None: every row can reach ``max_length``).
        cuda_graph: on a CUDA device, replay decode steps from graphs captured per batch bucket.
        snapshots: entries of the prefix cache's state snapshot pool (0: no prefix caching).
        compile: compile the decode step with `torch.compile` before capturing it (`sambay.generate.cuda_graphs`:
            inductor fuses the small ops between our kernels; about 6% faster at batch 1-8 on the H200, and
            tens of seconds more at start). Only with ``cuda_graph`` on a CUDA device.
        gemv: on a CUDA device, batch-1 decode projections run our GEMV kernel instead of cuBLAS
            (`sambay.model.gemv.use_gemv`, which converts the model's float linears in place: 5% faster
            batch-1 steps on the H200, eager and compiled; every other shape is unchanged).
    """

    def __init__(self, model: SambaY, *, slots: int, max_length: int, block_size: int, kv_blocks: int | None,
                 cuda_graph: bool = True, snapshots: int = 0, compile: bool = False, gemv: bool = True):
        self.model, self.slots, self.pad = model, slots, slots
        if gemv and model.device.type == "cuda":
            from sambay.model.gemv import use_gemv

            log.info("batch-1 decode: %d projections on the GEMV kernel", use_gemv(model))
        self.compile = compile and cuda_graph and model.device.type == "cuda"
        self._decode_step = self._decode_rows
        if self.compile:
            raise_recompile_limit()
            # the batch dimension becomes dynamic at the second bucket, so the buckets share a compiled step
            self._decode_step = torch.compile(self._decode_rows)
        self.cache = model.new_cache(batch_size=slots + 1, max_length=max_length, block_size=block_size,
                                     kv_blocks=kv_blocks)
        self.snapshots = SnapshotPool(self.cache, snapshots)
        self.last_tokens = torch.zeros(slots + 1, dtype=torch.long, device=self.device)  # (slots + 1,)
        self.row_adapters = torch.zeros(slots + 1, dtype=torch.long, device=self.device)  # (slots + 1,) per row
        self.adapter_index = torch.zeros(slots + 1, dtype=torch.long, device=self.device)  # (b,) of each forward
        self.has_lora = bind_adapter_index(model, self.adapter_index) > 0  # without adapters: no index to write
        stacked = [m.lora_A.shape[0] for m in model.modules() if isinstance(m, LoRALinear)]
        self.adapters = max(stacked, default=1) - 1  # adapters served beside the base model (slots 1..adapters)
        self.buckets = decode_buckets(slots)
        self._graphs: dict[int, _BucketGraph] = {}
        if cuda_graph and self.device.type == "cuda":
            started, pool = time.perf_counter(), torch.cuda.graph_pool_handle()
            for size in sorted(self.buckets, reverse=True):  # largest first: the others reuse its pool
                self._graphs[size] = _BucketGraph(self, size, pool)
            self.reset_rows([self.pad])
            log.info("decode steps captured in %d CUDA graphs (batch buckets %s) in %.1f s", len(self._graphs),
                     ", ".join(map(str, self.buckets)), time.perf_counter() - started)

    @property
    def device(self) -> torch.device:
        return self.cache.seqlens.device

    # the plan --------------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> Tensor | None:
        """Carry out ``plan``; returns (len(plan.emit), vocab) next-token logits of the emitting rows (None
        if none). The logits of decode rows may be a graph's static buffer: use them before the next call."""
        if plan.reset:
            self.reset_rows(plan.reset, plan.adapters)
        if plan.block_rows:
            self.set_block_rows(plan.block_rows, plan.block_table)
        if plan.restore:
            entries, slots, lengths = zip(*plan.restore, strict=True)
            self.snapshots.restore(*(upload(list(x), self.device) for x in (entries, slots, lengths)))
        outs = []
        if plan.prefill:
            logits = self._prefill_waves(plan.prefill)
            if logits is not None:
                outs.append(logits)
        if plan.copies:
            src = upload([s for s, _ in plan.copies], self.device)
            dst = upload([d for _, d in plan.copies], self.device)
            self.cache.copy_rows(src, dst)
            self.last_tokens[dst] = self.last_tokens[src]
            self.row_adapters[dst] = self.row_adapters[src]
        if plan.decode:
            outs.append(self.decode(plan.decode))
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _prefill_waves(self, chunks: Sequence[PrefillChunk]) -> Tensor | None:
        """Prefill ``chunks`` in waves (a row's second chunk runs in the wave after its first), saving the
        snapshots the chunks ask for after their wave; returns the emitting chunks' logits in plan order."""
        waves: list[list[int]] = []
        seen: dict[int, int] = {}
        for i, chunk in enumerate(chunks):
            wave = seen[chunk.slot] = seen.get(chunk.slot, -1) + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(i)
        emitted: dict[int, Tensor] = {}
        for wave in waves:
            part = [chunks[i] for i in wave]
            logits = self.prefill(part)
            emitted.update((i, logits[j]) for j, i in enumerate(wave) if chunks[i].emit)
            saves = [c for c in part if c.save >= 0]
            if saves:
                self.snapshots.save(upload([c.slot for c in saves], self.device),
                                    upload([c.save for c in saves], self.device))
        if not emitted:
            return None
        return torch.stack([emitted[i] for i in sorted(emitted)])

    def set_tokens(self, rows: Tensor, tokens: Tensor) -> None:
        """Record the tokens just sampled for ``rows`` ((k,) each, on the device): each row's next decode input."""
        self.last_tokens[rows] = tokens

    # cache operations ------------------------------------------------------------------------------

    def reset_rows(self, rows: Sequence[int], adapters: Sequence[int] = ()) -> None:
        """Make cache rows fresh for a new sequence: zero their Mamba states and lengths, and set the adapter
        slot each runs with (``adapters``, one per row; empty: the base model).

        The sliding-window rings and the shared K/V need no zeroing: which entries are valid is derived
        from ``seqlens`` alone, so a row of length 0 never reads its stale keys."""
        index = upload(list(rows), self.device)
        for state in self.cache.mamba:
            state.conv[index] = 0
            state.ssm[index] = 0
        self.cache.seqlens[index] = 0
        self.row_adapters[index] = upload(list(adapters), self.device) if adapters else 0

    def set_block_rows(self, rows: Sequence[int], table: Tensor) -> None:
        """Write rows of the block table: table (len(rows), max_blocks) int32 on the CPU."""
        if self.cache.paged:
            self.cache.full[0].block_table[upload(list(rows), self.device)] = upload(table, self.device)

    # forwards --------------------------------------------------------------------------------------

    def prefill(self, chunks: Sequence[PrefillChunk]) -> Tensor:
        """Run the chunks (one per row, ragged) in one forward; returns (len(chunks), vocab) logits of each
        chunk's last token. Only these rows are computed: their state is taken out of the cache and written
        back, so a prompt arriving alone costs its own tokens. Inputs were checked by the scheduler."""
        t = max(len(c.tokens) for c in chunks)
        tokens = torch.zeros(len(chunks), t, dtype=torch.long)  # (k, t) right-padded
        for i, chunk in enumerate(chunks):
            tokens[i, : len(chunk.tokens)] = torch.tensor(chunk.tokens)
        lengths = torch.tensor([len(c.tokens) for c in chunks])  # (k,)
        index, lengths = upload([c.slot for c in chunks], self.device), upload(lengths, self.device)
        part = self.cache.select(index)
        if self.has_lora:
            self.adapter_index[: len(chunks)] = self.row_adapters[index]
        logits = self.model(upload(tokens, self.device), part, lengths=lengths, check_inputs=False)
        part.advance(lengths)
        self.cache.update_rows(index, part)
        return logits[:, -1]

    def decode(self, rows: Sequence[int]) -> Tensor:
        """One token for each of ``rows`` (their last sampled token) → (len(rows), vocab) logits.

        On a GPU the rows are padded to the smallest bucket that holds them and the bucket's graph is
        replayed; elsewhere the step runs eagerly over exactly these rows."""
        k = len(rows)
        if not self._graphs:
            return self._decode_rows(upload(list(rows), self.device))
        size = next(s for s in self.buckets if s >= k)
        graph = self._graphs[size]
        index = torch.full((size,), self.pad, dtype=torch.long)
        index[:k] = torch.tensor(list(rows))
        graph.rows.copy_(index.pin_memory(), non_blocking=True)
        graph.graph.replay()
        return graph.logits[:k]

    def _decode_rows(self, rows: Tensor) -> Tensor:
        """The decode step of ``rows`` (B,) int64 on the device, sync-free (captured per bucket)."""
        start = self.cache.seqlens[rows]  # (B,)
        table = self.cache.full[0].block_table[rows] if self.cache.paged else None  # (B, max_blocks)
        view = self.cache.view(rows, start, table)
        if self.has_lora:
            self.adapter_index[: rows.shape[0]] = self.row_adapters[rows]
        logits = self.model(self.last_tokens[rows].view(-1, 1), view, check_inputs=False)[:, -1]
        self.cache.seqlens[rows] = start + 1
        self.cache.seqlens[self.pad :].zero_()  # padding rows always start at position 0 of the spare row
        return logits

    # warm-up ---------------------------------------------------------------------------------------

    def warm_up(self, prefill_chunk: int, prefill_budget: int | None = None) -> float:
        """Compile every prefill specialisation a request can hit, on the spare row; returns the seconds taken.

        Triton specialises kernels on whether integer arguments (lengths, starts, key counts) are 1 or
        multiples of 16. Each of the lengths 1, 16, 17 and ``prefill_chunk`` is prefilled into a fresh
        row, then continued by each of them, which covers aligned and unaligned chunks at aligned and
        unaligned starts, the key counts they make, and the cross-decoder's one-query step over them.
        Then one row grows to the cache's length in ``prefill_budget`` chunks: the one-query attention
        step splits its keys into a number of parts that doubles with the context (a compile-time
        constant), so without this the first 2K, 4K, 8K... prompt each paid a compile (0.5 s seen on the
        H200). The spare row borrows blocks (nothing is running yet). It goes through `execute`, so a
        tensor-parallel runner warms every rank."""
        started = time.perf_counter()
        room, table, vocab = self.cache.max_length, None, self.model.config.vocab_size
        if self.cache.paged:
            full = self.cache.full[0]
            table = torch.zeros(1, full.block_table.shape[1], dtype=torch.int32)
            blocks = min(table.shape[1], full.k.shape[0] - 1)
            table[0, :blocks] = torch.arange(1, blocks + 1)
            room = min(room, blocks * full.block_size)
        lengths = sorted({1, 16, 17, max(17, min(prefill_chunk, room // 4))})
        rows = () if table is None else (self.pad,)  # the block-table row the spare row borrows, if paged

        def chunk(n: int) -> tuple[PrefillChunk, ...]:
            return (PrefillChunk(self.pad, tuple(i % vocab for i in range(1, n + 1)), True),)

        with torch.inference_mode():
            self.execute(StepPlan(block_rows=rows, block_table=table))
            for first in lengths:
                for n in lengths:
                    if first + n <= room:
                        self.execute(StepPlan(reset=(self.pad,), prefill=chunk(first)))
                        self.execute(StepPlan(prefill=chunk(n)))
            self._grow(chunk, room, prefill_budget or prefill_chunk)
            cleared = None if table is None else torch.zeros_like(table)
            self.execute(StepPlan(reset=(self.pad,), block_rows=rows, block_table=cleared))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _grow(self, chunk, room: int, step: int) -> None:
        """Prefill the spare row in ``step``-token chunks until it holds ``room`` tokens (see `warm_up`)."""
        self.execute(StepPlan(reset=(self.pad,)))
        for filled in range(0, room, step):
            self.execute(StepPlan(prefill=chunk(min(step, room - filled))))
