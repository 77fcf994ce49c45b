"""Continuous-batching policy: which requests run, which rows prefill or decode, which blocks they own.

    add() ─► waiting (FIFO) ─admit─► running: rows of the cache (slots) ─finish / cancel─► free
               ▲                         │ schedule() → StepPlan + the rows to sample, per step:
               └── preempted ◄───────────├─ prefill: at most `prefill_budget` prompt tokens, at most
                   (recomputed)          │  `prefill_chunk` per request (one ragged forward)
                                         └─ decode: one token for every decoding row (bucketed)

The scheduler is pure policy on the host: it owns no model and no device tensor, and its decisions
depend only on what it has planned, never on values still being computed. `schedule()` returns a
`StepPlan` for the `ModelRunner` and the rows whose next token the step samples; `update()` takes
the sampled tokens back (one step later under asynchronous scheduling: `sambay.generate.core`) and
turns them into outputs through the `OutputProcessor`.

Notable features:
- Memory follows the tokens in flight: ``slots`` rows of constant state and a pool of K/V blocks
  (`BlockPool`) handed out as rows grow. Admission needs free slots for the request's samples and
  blocks for its prompt; a request with n samples prefills its prompt once and fans it out.
- Preemption (vLLM's recompute policy): when a decoding row needs a block and none is free, the most
  recently admitted request gives its slots and blocks back and waits, ahead of new requests, to be
  re-prefilled with its prompt and the tokens it has generated (once none of its tokens is still in
  flight); its stream simply pauses.
- Planned, not observed: a row's length and planned token count advance when a step is planned, so the
  next step can be planned before the previous one's tokens reach the host. A row that turns out to
  have stopped (a stop id or string) has then decoded one token too many, which is dropped.
- A request's chunk boundaries depend on that request alone, and every kernel computes each row
  independently of its neighbours, so greedy output is the same alone or among others.
- Prefix caching (`sambay.generate.prefix_cache`, when the runner has a snapshot pool): a new request
  starts from the longest cached prefix of its prompt (its state restored, its K/V blocks shared), and
  prefilling rows save snapshots at block-aligned chunk ends and at the last block boundary of each
  prompt. The n samples of a request always share the prompt's full K/V blocks. Requests of different
  LoRA adapters never share cached state (the key chain starts from the adapter).
- LoRA adapters: a request's rows run with its adapter (``Request.adapter``, a slot of the stacked
  adapters; 0 is the base model), named in the plan when the rows start; one step mixes adapters.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from sambay.generate.blocks import BlockPool, blocks_for
from sambay.generate.outputs import OutputProcessor, SequenceState
from sambay.generate.plan import PrefillChunk, StepPlan
from sambay.generate.prefix_cache import Hit, PrefixCache, chain_keys, chain_seed
from sambay.generate.requests import Output, Request, SchedulerConfig

log = logging.getLogger("sambay.scheduler")


@dataclass(eq=False)  # identity: rows and runs are compared with `is`
class Row:
    """One sample of a running request."""

    slot: int  # -1 while the request is preempted
    sample_index: int
    seq: SequenceState
    generator: torch.Generator
    length: int = 0  # tokens of this row in the cache once the planned steps have run
    planned: int = 0  # tokens sampled, or to be sampled by planned steps
    done: bool = False
    generated: list[int] = field(default_factory=list)  # tokens that reached the host


@dataclass(eq=False)
class _Job:
    """Tokens a row still has to prefill: its prompt, or after preemption its whole history."""

    row: Row
    tokens: list[int]
    consumed: int = 0
    keys: list[int] | None = None  # `chain_keys` of the tokens' full blocks, once needed
    seed: int = 0  # the chain's start: the request's adapter (`chain_seed`)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.consumed


@dataclass(eq=False)
class Run:
    """An admitted request: its rows, what they still prefill, and its steps still in flight."""

    request: Request
    rows: list[Row]
    jobs: list[_Job]
    fresh: bool = True  # no token planned yet: the end of the prefill samples (and fans out n samples)
    inflight: int = 0  # planned steps that sample this request and have not been processed
    closed: bool = False  # finished or cancelled: later results are dropped

    @property
    def prefilling(self) -> bool:
        return any(job.remaining for job in self.jobs)

    @property
    def live(self) -> list[Row]:
        return [row for row in self.rows if not row.done]


@dataclass(frozen=True)
class Sample:
    """A row whose next token the step samples, from row ``index`` of the step's logits."""

    run: Run
    row: Row
    index: int


@dataclass(frozen=True)
class Step:
    """What `Scheduler.schedule` decided: the plan, the rows it samples, and the runs admitted by it."""

    plan: StepPlan
    samples: tuple[Sample, ...]
    admitted: tuple[Run, ...] = ()  # started or resumed (their sampling state must be set up)


class Scheduler:
    """Admission, preemption, blocks and step plans over ``config.slots`` cache rows (module docstring).

    Args:
        config: capacity and per-step bounds.
        blocks: the allocator of the runner's paged K/V.
        outputs: makes each row's `SequenceState` and turns its tokens into deltas.
        max_length: tokens per row.
        make_generator: seed (or None) → the row's `torch.Generator`.
        snapshots: entries of the runner's snapshot pool (0: no prefix caching).
    """

    def __init__(self, config: SchedulerConfig, blocks: BlockPool, outputs: OutputProcessor, max_length: int,
                 make_generator, snapshots: int = 0):
        self.config, self.blocks, self.outputs, self.max_length = config, blocks, outputs, max_length
        prefix = PrefixCache(blocks, snapshots)
        self.prefix = prefix if prefix.enabled else None
        self._make_generator = make_generator
        self.preemptions = 0
        self.free = list(range(config.slots))
        self.running: list[Run] = []  # in admission order
        self.waiting: deque[Request] = deque()
        self.preempted: deque[Run] = deque()  # resumed before any waiting request
        self._steps = itertools.count()

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting or self.preempted)

    # requests leaving -----------------------------------------------------------------------------

    def cancel(self, ids: set[int]) -> list[Request]:
        """Drop the requests with these ids wherever they are; returns the ones found."""
        dropped = [r for r in self.waiting if r.id in ids]
        for request in dropped:
            self.waiting.remove(request)
        for run in [run for run in (*self.preempted, *self.running) if run.request.id in ids]:
            self._close(run)
            dropped.append(run.request)
        return dropped

    def drain(self) -> list[Request]:
        """Drop every request (shutdown, failure); returns them."""
        return self.cancel({r.id for r in self.waiting} | {run.request.id for run in (*self.running, *self.preempted)})

    def _close(self, run: Run) -> None:
        run.closed = True
        for row in run.live:
            row.done = True
            if row.slot >= 0:
                self._free_slot(row.slot)
        if run in self.running:
            self.running.remove(run)
        if run in self.preempted:
            self.preempted.remove(run)

    def _free_slot(self, slot: int) -> None:
        self.blocks.release(slot)
        self.free.append(slot)
        self.free.sort()

    # planning -------------------------------------------------------------------------------------

    def schedule(self) -> Step:
        """Admit what fits, choose this step's prefill chunks and decoding rows, and write the plan."""
        decode = self._plan_decode()  # first: running requests get their blocks before new ones are admitted
        admitted, reset, adapters, restore = self._admit()
        samples: list[Sample] = []
        chunks, copies = self._plan_prefill(samples, decoding=bool(decode))
        base = sum(c.emit for c in chunks)  # logits rows: the emitting prefill chunks, then the decode rows
        for j, (run, row) in enumerate(decode):
            samples.append(Sample(run, row, base + j))
            row.length += 1
        for sample in samples:
            sample.row.planned += 1
        for run in {id(s.run): s.run for s in samples}.values():
            run.inflight += 1
        changes = self.blocks.take_changes()
        rows, table = changes if changes is not None else ((), None)
        plan = StepPlan(reset=tuple(reset), block_rows=tuple(rows), block_table=table, restore=tuple(restore),
                        prefill=tuple(chunks), copies=tuple(copies), decode=tuple(row.slot for _, row in decode),
                        adapters=tuple(adapters) if any(adapters) else ())
        return Step(plan, tuple(samples), tuple(admitted))

    def _admit(self) -> tuple[list[Run], list[int], list[int], list[tuple[int, int, int]]]:
        """Resume preempted runs, then start waiting requests, while they fit; returns the runs admitted, the
        rows they reset with each row's adapter, and the rows restored from cached prefixes."""
        admitted, reset, adapters, restore = [], [], [], []
        while True:
            if self.preempted:
                run = self.preempted[0]
                if run.inflight or (resumed := self._resume(run)) is None:
                    break
                self.preempted.popleft()
                slots, hits = resumed
                reset += slots
                adapters += [run.request.adapter] * len(slots)
                restore += hits
            elif self.waiting and (started := self._start(self.waiting[0])) is not None:
                self.waiting.popleft()
                run, hit = started
                reset += [row.slot for row in run.rows]
                adapters += [run.request.adapter] * len(run.rows)
                if hit is not None:
                    restore.append((hit.entry, run.rows[0].slot, hit.length))
            else:
                break
            admitted.append(run)
        return admitted, reset, adapters, restore

    def _start(self, request: Request) -> tuple[Run, Hit | None] | None:
        """Admit a new request if it fits (None if not): n rows, the first holding the prompt's cached prefix
        (if any) and blocks for the rest, the others sharing its full blocks; the first prefills the rest."""
        params, prompt, size = request.params, list(request.prompt), self.blocks.block_size
        seed = chain_seed(request.adapter)
        keys, hit = self._lookup(prompt, seed)
        shared = hit.blocks if hit else ()
        whole = blocks_for(len(prompt), size) if self.blocks.paged else 0
        need = whole - len(shared) + (params.n - 1) * (whole - len(prompt) // size if self.blocks.paged else 0)
        if len(self.free) < params.n or self.blocks.available(shared) < need:
            return None
        if self.prefix:
            self.prefix.count(len(prompt), hit)
        slots, self.free = self.free[: params.n], self.free[params.n :]
        self.blocks.share(slots[0], shared)
        for slot in slots:
            if slot != slots[0]:
                self.blocks.share(slot, self.blocks.owned(slots[0])[: len(prompt) // size])
            assert self.blocks.grow(slot, len(prompt))  # counted above
        limit = min(params.max_new_tokens, self.max_length - len(prompt))
        rows = [Row(slot, j, self.outputs.sequence(params, limit),
                    self._make_generator(None if params.seed is None else params.seed + j))
                for j, slot in enumerate(slots)]
        length = hit.length if hit else 0
        rows[0].length = length
        run = Run(request, rows, [_Job(rows[0], prompt, consumed=length, keys=keys, seed=seed)])
        self.running.append(run)
        return run, hit

    def _lookup(self, tokens: list[int], seed: int) -> tuple[list[int], Hit | None]:
        """The `chain_keys` of ``tokens`` (from ``seed``) and their longest cached prefix (none without a cache)."""
        if self.prefix is None:
            return [], None
        keys = chain_keys(tokens, self.blocks.block_size, len(tokens) // self.blocks.block_size, seed)
        return keys, self.prefix.lookup(tokens, keys, seed)

    def _resume(self, run: Run) -> tuple[list[int], list[tuple[int, int, int]]] | None:
        """Re-admit a preempted request if it fits (None if not): each live row re-prefills its prompt and every
        token it generated, from the longest cached prefix of that history; returns its slots and restores."""
        histories = [run.request.prompt + row.generated for row in run.live]
        size, seed = self.blocks.block_size, chain_seed(run.request.adapter)
        keys, hits = zip(*(self._lookup(h, seed) for h in histories), strict=True)
        shared = {block for hit in hits if hit for block in hit.blocks}
        need = sum(blocks_for(len(h), size) - (len(hit.blocks) if hit else 0) for h, hit in zip(histories, hits,
                                                                                                strict=True))
        if len(self.free) < len(histories) or (self.blocks.paged and self.blocks.available(tuple(shared)) < need):
            return None
        slots, self.free = self.free[: len(histories)], self.free[len(histories) :]
        restore, run.jobs = [], []
        for row, slot, history, k, hit in zip(run.live, slots, histories, keys, hits, strict=True):
            self.blocks.share(slot, hit.blocks if hit else ())
            assert self.blocks.grow(slot, len(history))  # counted above
            length = hit.length if hit else 0
            row.slot, row.length, row.planned = slot, length, len(row.generated)
            run.jobs.append(_Job(row, history, consumed=length, keys=k or None, seed=seed))
            if self.prefix:
                self.prefix.count(len(history), hit)
            if hit:
                restore.append((hit.entry, slot, length))
        self.running.append(run)
        return slots, restore

    def _preempt(self, run: Run) -> None:
        """Give ``run``'s slots and blocks back; it waits, ahead of new requests, to be recomputed."""
        self.preemptions += 1
        for row in run.live:
            self._free_slot(row.slot)
            row.slot, row.length = -1, 0
        self.running.remove(run)
        if run.fresh:  # nothing planned yet: start over as a new request
            self.waiting.appendleft(run.request)
        else:
            self.preempted.appendleft(run)
        log.info("preempted request %d (K/V blocks exhausted); %d preemptions so far", run.request.id,
                 self.preemptions)

    def _plan_prefill(self, samples: list[Sample], decoding: bool) -> tuple[list[PrefillChunk], list[tuple[int, int]]]:
        """The next chunk of prefilling rows, FIFO, within the per-step budget; rows that finish are sampled."""
        chunks, copies, budget = [], [], self.config.prefill_budget
        # a request's chunk is capped to bound the step's latency for rows that decode; with none
        # decoding, a lone prompt takes the whole budget (its time to first token is the only latency)
        cap = self.config.prefill_chunk if decoding else budget
        for run in self.running:
            for job in run.jobs:
                take = min(cap, job.remaining)
                if not take or take > budget:
                    continue
                budget -= take
                start = job.consumed
                job.consumed += take
                job.row.length += take
                ends = not job.remaining
                for lo, hi, save in self._pieces(job, start, ends):
                    chunks.append(PrefillChunk(job.row.slot, tuple(job.tokens[lo:hi]), ends and hi == job.consumed,
                                               save))
                if not ends:
                    continue
                index = sum(c.emit for c in chunks) - 1
                if run.fresh:  # the prompt is in: fan it out to the other samples, sample every row
                    first = run.rows[0]
                    for row in run.rows[1:]:
                        copies.append((first.slot, row.slot))
                        row.length = first.length
                    samples += [Sample(run, row, index) for row in run.rows]
                    run.fresh = False
                else:
                    samples.append(Sample(run, job.row, index))
            run.jobs = [job for job in run.jobs if job.remaining]
        return chunks, copies

    def _pieces(self, job: _Job, start: int, ends: bool) -> list[tuple[int, int, int]]:
        """The chunk ``job.tokens[start:job.consumed]`` as (start, end, snapshot entry or -1) pieces: with a
        prefix cache, the chunk that reaches the last block boundary before the final token is cut there and
        the state saved (`prefix_cache`), and any other block-aligned chunk end inside the tokens saves too."""
        end = job.consumed
        if self.prefix is None:
            return [(start, end, -1)]
        size = self.blocks.block_size
        last = (len(job.tokens) - 1) // size * size  # the boundary every prompt is cached at
        cut = last if start < last <= end else end
        if cut <= start or cut % size or (cut == end and ends):
            return [(start, end, -1)]
        if job.keys is None:
            job.keys = chain_keys(job.tokens, size, len(job.tokens) // size, job.seed)
        entry = self.prefix.snapshot(job.tokens, job.keys, cut, self.blocks.owned(job.row.slot), job.seed)
        save = -1 if entry is None else entry
        return [(start, end, save)] if cut == end else [(start, cut, save), (cut, end, -1)]

    def _plan_decode(self) -> list[tuple[Run, Row]]:
        """Rows that decode this step (their last token is sampled or being sampled), blocks reserved."""
        decode = []
        for run in list(self.running):  # oldest first
            if run not in self.running or run.prefilling or run.fresh:
                continue
            for row in run.live:
                if row.planned >= row.seq.limit or not self._reserve(run, row):
                    continue
                decode.append((run, row))
        return [(run, row) for run, row in decode if run in self.running]

    def _reserve(self, run: Run, row: Row) -> bool:
        """A block for the row's next position, preempting the newest requests if needed (False: ``run`` was)."""
        if not self.blocks.paged or row.length % self.blocks.block_size:
            return True  # the next position is inside a block the row owns
        while run in self.running and not self.blocks.grow(row.slot, row.length + 1):
            self._preempt(self.running[-1])
        return run in self.running

    # results --------------------------------------------------------------------------------------

    def update(self, step: Step, tokens: list[int], logprobs: list | None) -> list[tuple[Request, Output]]:
        """Take the sampled tokens of ``step`` (one per sample, in order); returns the outputs to deliver."""
        deltas: dict[int, list] = {}
        runs: dict[int, Run] = {}
        for i, sample in enumerate(step.samples):
            run, row = sample.run, sample.row
            runs[id(run)] = run
            if run.closed or row.done:
                continue  # a step planned before the row stopped, or the request was cancelled
            row.generated.append(tokens[i])
            delta = self.outputs.delta(row.seq, row.sample_index, tokens[i], None if logprobs is None else logprobs[i])
            deltas.setdefault(id(run), []).append(delta)
            if delta.finish_reason:
                row.done = True
                if row.slot >= 0:
                    self._free_slot(row.slot)
        delivered = []
        for key, run in runs.items():
            run.inflight -= 1
            if key not in deltas:
                continue
            finished = all(row.done for row in run.rows)
            if finished:
                self._close(run)
            delivered.append((run.request, Output(tuple(deltas[key]), finished=finished)))
        return delivered
