"""Continuous batching: requests join and leave the running batch at every step, each in its own cache slot.

    submit() ─► waiting (bounded FIFO) ─admit─► slots: rows of ONE SambaYCache ─finish / cancel─► free
                   ▲                               │ every step, in the model thread:
                   └── preempted (recomputed) ◄────├─ prefill: at most `prefill_budget` prompt tokens, at
                                                   │  most `prefill_chunk` per request (one ragged forward)
                                                   └─ decode: one token for every running row (one forward)

A slot is a row of the hybrid state: the Mamba conv/SSM states and the sliding-window rings (constant
size), and the row's blocks of the paged shared K/V (`sambay.cache.PagedKV`), which grow with the
sequence. The model's ``lengths=`` argument lets rows at different points of their sequence, and idle
rows (length 0, state untouched), share one forward; each row continues its own sequence.

Notable features:
- Memory follows the tokens in flight (`MemoryBudget`): ``slots`` rows of constant state, and a pool of
  ``kv_blocks`` K/V blocks of ``block_size`` tokens (`BlockPool`) handed out as rows grow. Admission
  needs free slots for the request's samples and blocks for its prompt; a request with n samples
  prefills its prompt once in its first row and fans it out with `SambaYCache.copy_rows`.
- Preemption (vLLM's recompute policy): when a decoding row needs a block and none is free, the most
  recently admitted request gives its slots and blocks back and waits, ahead of new requests, to be
  re-prefilled with its prompt and the tokens it has generated; its stream simply pauses. A request
  that could not finish even alone (n rows of prompt + max_tokens > the pool) is refused at `submit`,
  so the oldest request can always run.
- Decode latency stays bounded while long prompts arrive: a step prefills at most `prefill_budget`
  prompt tokens, in chunks of at most `prefill_chunk` per request (the model's chunked prefill).
- Batch invariance: prefill forwards span all slots with per-row ``lengths``; decode forwards take the
  model's static decode path (one token per slot, ``active`` marking the rows that advance: no host
  sync, so on a GPU it is replayed from a CUDA graph), whatever the other slots are doing. A request's
  chunk boundaries depend on that request alone, so its arithmetic does not depend on its neighbours:
  greedy output is the same alone or among others (tested, with staggered arrivals). A preempted
  request's recomputed prefix is numerically close to, not bitwise equal to, its decoded one.
  Sampling is grouped by parameters; each row draws from its own generator (``seed + j``).
- All model and cache work goes through a `ModelRunner` (a tensor-parallel server replays each of its
  calls on every rank).
- Threads: `submit` and `cancel` may be called from any thread; one background thread runs the model.
  Outputs reach each request through its sink callback, called in the model thread
  (`sambay.serve.runtime.AsyncStream` adapts that to asyncio). Cancellation frees the slots at the next
  step boundary.
- `close(grace)` refuses new requests, lets admitted and waiting ones finish for ``grace`` seconds, then
  aborts the rest with an error output.
- Prefill forwards compute only the rows that have tokens (`ModelRunner.prefill`); decode forwards span
  every slot (static shapes, one CUDA graph), which costs little: a decode step reads the weights once
  whatever the batch.
- Known limitations: blocks are not shared between requests (no prefix caching yet), so n samples copy
  their prompt's blocks; the host work of a step (sampling read-back, detokenizing, delivery) does not
  overlap the GPU work of the next one.
- The caller-facing types (config, requests, outputs, refusals) live in `sambay.generate.requests`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sambay.generate.blocks import BlockPool, MemoryBudget, blocks_for, kv_blocks_for_budget, memory_budget
from sambay.generate.engine import Engine, SequenceDelta, SequenceState, TokenLogprob
from sambay.generate.requests import (
    Limits,
    Output,
    PromptTooLong,
    QueueFull,
    Request,
    SchedulerClosed,
    SchedulerConfig,
    Timing,
    deliver,
)
from sambay.generate.runner import ModelRunner, reset_rows
from sambay.generate.sampling import PenaltyState, SamplingParams, make_generator, sample
from sambay.model.sambay import SambaY

__all__ = ["Limits", "MemoryBudget", "Output", "PromptTooLong", "QueueFull", "Request", "Scheduler", "SchedulerClosed",
           "SchedulerConfig", "Timing", "make_runner", "reset_rows", "sized_for_budget"]

log = logging.getLogger("sambay.scheduler")


@dataclass(eq=False)  # identity: rows and runs are compared with `is`
class _Row:
    """One sample of a running request in its slot."""

    slot: int  # -1 while the request is preempted
    sample_index: int
    seq: SequenceState
    generator: torch.Generator
    pending: int | None = None  # sampled token not yet fed to the model
    done: bool = False
    length: int = 0  # tokens of this row held in the cache
    generated: list[int] = field(default_factory=list)  # every sampled token (pending included)


@dataclass(eq=False)
class _Job:
    """Tokens a row still has to prefill: its prompt, or after preemption its whole history."""

    row: _Row
    tokens: Tensor  # (t,) int64 on the CPU
    consumed: int = 0

    @property
    def remaining(self) -> int:
        return self.tokens.numel() - self.consumed


@dataclass(eq=False)
class _Running:
    """An admitted request: its rows and what they still prefill."""

    request: Request
    rows: list[_Row]
    jobs: list[_Job]
    fresh: bool = True  # nothing sampled yet: the end of the prefill samples (and fans out n samples)

    @property
    def prefilling(self) -> bool:
        return any(job.remaining for job in self.jobs)

    @property
    def live(self) -> list[_Row]:
        return [row for row in self.rows if not row.done]


def make_runner(model: SambaY, config: SchedulerConfig, cls: type[ModelRunner] = ModelRunner) -> ModelRunner:
    """The runner (and cache) a scheduler with ``config`` needs; ``cls`` may be a broadcasting subclass."""
    max_length = config.max_length or model.config.max_seq_len
    memory = memory_budget(model, config.slots, max_length, config.block_size, config.kv_blocks)
    if memory.kv_blocks and memory.kv_blocks < blocks_for(max_length, config.block_size):
        raise ValueError(f"the K/V pool holds {memory.kv_tokens} tokens, less than one sequence of "
                         f"max_length = {max_length}: give it more memory or lower max_length")
    return cls(model, slots=config.slots, max_length=max_length, block_size=config.block_size,
               kv_blocks=memory.kv_blocks or None, cuda_graph=config.cuda_graph)


def sized_for_budget(config: SchedulerConfig, model: SambaY, budget_bytes: int) -> SchedulerConfig:
    """``config`` with its K/V pool sized to a cache budget (`kv_blocks_for_budget`; ValueError if too small)."""
    max_length = config.max_length or model.config.max_seq_len
    kv_blocks = kv_blocks_for_budget(model, config.slots, max_length, config.block_size, budget_bytes)
    return dataclasses.replace(config, kv_blocks=kv_blocks)


def _sampling_key(p: SamplingParams) -> tuple:
    """Rows whose requests share these fields are sampled together."""
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.logprobs)


class Scheduler:
    """Continuous batching over one model and one cache of ``config.slots`` rows (module docstring).

    Args:
        engine: the model, tokenizer and default stop ids (`Engine`).
        config: capacity and per-step bounds.
        runner: executes the forwards and cache operations, made by `make_runner` for the same config
            (default: a `ModelRunner` on the engine's model).
        on_step: called in the model thread after each step of `start`'s loop (e.g. to send the step's
            outputs on in one message).
    """

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None, runner: ModelRunner | None = None,
                 on_step: Callable[[], None] | None = None):
        self.engine, self.model, self.config = engine, engine.model, config or SchedulerConfig()
        self.on_step = on_step
        self.runner = runner or make_runner(self.model, self.config)
        self.max_length = self.runner.cache.max_length
        c = self.config
        self.memory = memory_budget(self.model, c.slots, self.max_length, c.block_size, c.kv_blocks)
        self.cache = self.runner.cache
        self.blocks = BlockPool(self.cache)
        self.preemptions = 0
        self._ids = itertools.count()
        self._free = list(range(c.slots))
        self._running: list[_Running] = []  # in admission order
        self._waiting: deque[Request] = deque()
        self._preempted: deque[_Running] = deque()  # resumed before any waiting request
        self._cancelled: set[int] = set()
        self._penalties: PenaltyState | None = None  # (slots, vocab), allocated on first use
        self._lock = threading.Condition()
        self._closing = self._stop = False
        self._thread: threading.Thread | None = None

    # public, thread-safe -------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once `close` has been called: new requests are refused."""
        return self._closing

    def stats(self) -> dict[str, int]:
        """Requests running and waiting (preempted ones included), free slots and K/V blocks."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting) + len(self._preempted),
                    "free_slots": len(self._free), "free_blocks": self.blocks.free_blocks,
                    "preemptions": self.preemptions}

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Output], None]) -> Request:
        """Queue a request; its outputs go to ``sink`` (called in the model thread).

        Args:
            prompt: token ids, at most ``max_length - 1`` of them.
            params: sampling parameters; ``params.n`` samples take n slots.
            sink: receives each `Output`; the last has ``finished=True``.

        Raises:
            PromptTooLong, ValueError: the request can never run. QueueFull, SchedulerClosed: not now.
        """
        prompt = [int(i) for i in prompt]
        self.limits.check(prompt, params)
        request = Request(self, prompt, params, sink)
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(f"server overloaded: {len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    @property
    def limits(self) -> Limits:
        """What a request may ask of this scheduler (checked at `submit`)."""
        return Limits(vocab_size=self.model.config.vocab_size, max_length=self.max_length, slots=self.config.slots,
                      block_size=self.blocks.block_size, kv_blocks=self.blocks.capacity if self.blocks.paged else 0)

    def cancel(self, request: Request) -> None:
        """Stop ``request`` and free its slots at the next step boundary."""
        with self._lock:
            self._cancelled.add(request.id)
            self._lock.notify_all()

    def start(self) -> Scheduler:
        """Run the model loop in a background thread; returns self."""
        self._thread = threading.Thread(target=self._loop, name="sambay-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, grace: float = 30.0) -> None:
        """Refuse new requests, let the admitted and waiting ones finish for ``grace`` s, abort the rest."""
        deadline = time.monotonic() + grace
        with self._lock:
            self._closing = True
            while self._thread is not None and self._busy() and time.monotonic() < deadline:
                self._lock.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0)))
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._abort_all("the server shut down before the request finished")

    # the model loop ------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._running or self._waiting or self._preempted)

    def _loop(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)  # the current device is per thread
        while True:
            with self._lock:
                while not (self._stop or self._busy() or self._cancelled):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                log.exception("scheduler step failed")
                self._abort_all(f"internal error: {type(e).__name__}: {e}")
            if self.on_step is not None:
                self.on_step()
            with self._lock:
                self._lock.notify_all()  # wakes `close` waiting for the batch to drain

    def step(self) -> None:
        """One iteration: apply cancellations, admit waiting requests, one prefill and one decode forward."""
        self._apply_cancellations()
        self._admit()
        with torch.inference_mode():
            self._prefill_step()
            self._decode_step()

    def _abort_all(self, message: str) -> None:
        with self._lock:
            requests = [run.request for run in (*self._running, *self._preempted)] + list(self._waiting)
            self._waiting.clear()
            self._preempted.clear()
        for run in list(self._running):
            self._release(run)
        for request in requests:
            deliver(request, Output((), finished=True, error=message))

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.id in cancelled]
            for request in dropped:
                self._waiting.remove(request)
            for run in [run for run in self._preempted if run.request.id in cancelled]:
                self._preempted.remove(run)
                dropped.append(run.request)
        for run in [run for run in self._running if run.request.id in cancelled]:
            self._release(run)
            dropped.append(run.request)
        for request in dropped:
            deliver(request, Output((), finished=True))

    def _free_slot(self, slot: int) -> None:
        self.blocks.release(slot)
        self._free.append(slot)
        self._free.sort()

    def _release(self, run: _Running) -> None:
        """Free every slot of ``run`` and forget it."""
        for row in run.live:
            row.done = True
            self._free_slot(row.slot)
        self._running.remove(run)

    # admission and preemption --------------------------------------------------------------------

    def _admit(self) -> None:
        while True:
            with self._lock:
                resumed = bool(self._preempted)
                if resumed:
                    run = self._preempted[0]
                    ok = self._fits([len(run.request.prompt) + len(row.generated) - 1 for row in run.live])
                    if ok:
                        self._preempted.popleft()
                elif self._waiting:
                    head = self._waiting[0]
                    ok = self._fits([len(head.prompt)] * head.params.n)
                    if ok:
                        request = self._waiting.popleft()
                else:
                    return
            if not ok:
                return
            self._resume(run) if resumed else self._start(request)

    def _fits(self, lengths: list[int]) -> bool:
        """Free slots and blocks for rows of these lengths?"""
        need = sum(blocks_for(n, self.blocks.block_size) for n in lengths) if self.blocks.paged else 0
        return len(self._free) >= len(lengths) and self.blocks.free_blocks >= need

    def _take_slots(self, lengths: list[int]) -> list[int]:
        slots, self._free = self._free[: len(lengths)], self._free[len(lengths) :]
        for slot, n in zip(slots, lengths, strict=True):
            assert self.blocks.grow(slot, n)  # checked by `_fits`
        self.runner.reset_rows(slots)
        return slots

    def _start(self, request: Request) -> None:
        """Admit a new request: n rows, blocks for the prompt in each, the prompt to prefill in the first."""
        params, engine = request.params, self.engine
        request.timing.admitted = time.perf_counter()
        slots = self._take_slots([len(request.prompt)] * params.n)
        stop_ids = frozenset(engine.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        limit = min(params.max_new_tokens, self.max_length - len(request.prompt))
        device = self.runner.device
        rows = [_Row(slot, j, SequenceState(engine.tokenizer, params, stop_ids, limit),
                     make_generator(None if params.seed is None else params.seed + j, device))
                for j, slot in enumerate(slots)]
        prompt = torch.tensor(request.prompt, dtype=torch.long)
        if params.has_penalties:
            self._init_penalties(rows, prompt)
        self._running.append(_Running(request, rows, [_Job(rows[0], prompt)]))

    def _resume(self, run: _Running) -> None:
        """Re-admit a preempted request: each live row re-prefills its prompt and generated tokens."""
        live = run.live
        histories = [torch.tensor(run.request.prompt + row.generated[:-1], dtype=torch.long) for row in live]
        for row, slot in zip(live, self._take_slots([h.numel() for h in histories]), strict=True):
            row.slot, row.length = slot, 0
        if run.request.params.has_penalties:
            self._init_penalties(live, torch.tensor(run.request.prompt, dtype=torch.long))
        run.jobs = [_Job(row, h) for row, h in zip(live, histories, strict=True)]
        self._running.append(run)

    def _preempt(self, run: _Running) -> None:
        """Give ``run``'s slots and blocks back; it waits, ahead of new requests, to be recomputed."""
        self.preemptions += 1
        for row in run.live:
            self._free_slot(row.slot)
            row.slot, row.length = -1, 0
        self._running.remove(run)
        with self._lock:
            if run.fresh:  # nothing delivered yet: start over as a new request
                self._waiting.appendleft(run.request)
            else:
                self._preempted.appendleft(run)
        log.info("preempted request %d (K/V blocks exhausted); %d preemptions so far", run.request.id,
                 self.preemptions)

    def _reserve_decode_blocks(self) -> None:
        """Give every decoding row a block for its next token, preempting the newest requests if needed."""
        for run in list(self._running):  # oldest first
            if run not in self._running or run.prefilling or run.fresh:
                continue
            for row in run.live:
                if row.length % self.blocks.block_size:
                    continue  # the next position is inside a block the row owns
                while run in self._running and not self.blocks.grow(row.slot, row.length + 1):
                    self._preempt(self._running[-1])

    def _init_penalties(self, rows: list[_Row], prompt: Tensor) -> None:
        if self._penalties is None:
            shape, device = (self.config.slots, self.model.config.vocab_size), self.runner.device
            self._penalties = PenaltyState(torch.zeros(shape, dtype=torch.bool, device=device),
                                           torch.zeros(shape, dtype=torch.int32, device=device))
        prompt = prompt.to(self.runner.device)
        for row in rows:
            self._penalties.prompt_mask[row.slot] = False
            self._penalties.prompt_mask[row.slot, prompt] = True
            counts = torch.bincount(torch.tensor(row.generated, dtype=torch.long),
                                    minlength=self.model.config.vocab_size)
            self._penalties.output_counts[row.slot] = counts.to(self._penalties.output_counts)

    # the forwards --------------------------------------------------------------------------------

    def _sync_blocks(self) -> None:
        changes = self.blocks.take_changes()
        if changes is not None:
            self.runner.set_block_rows(*changes)

    def _prefill_step(self) -> None:
        """Consume the next chunk of prefilling rows, FIFO, within the per-step budget."""
        chosen, budget = [], self.config.prefill_budget
        for run in self._running:
            for job in run.jobs:
                take = min(self.config.prefill_chunk, job.remaining)
                if take and take <= budget:
                    chosen.append((run, job, take))
                    budget -= take
        if not chosen:
            return
        self._sync_blocks()
        tokens = torch.zeros(self.config.slots, max(take for *_, take in chosen), dtype=torch.long)  # (slots, t)
        lengths = torch.zeros(self.config.slots, dtype=torch.long)  # (slots,) idle rows: 0
        for _, job, take in chosen:
            tokens[job.row.slot, :take] = job.tokens[job.consumed : job.consumed + take]
            lengths[job.row.slot] = take
            job.consumed += take
            job.row.length += take
        logits = self.runner.prefill(tokens, lengths)
        for run in dict.fromkeys(run for run, _, _ in chosen):
            run.jobs = [job for job in run.jobs if job.remaining]  # `prefilling` stays cheap
        rows, index = [], []
        for run in dict.fromkeys(run for run, _, _ in chosen):  # each run once, in order
            if run.prefilling or not run.fresh:
                continue
            first, others = run.rows[0], run.rows[1:]
            if others:  # n samples: fan the prefilled row out (their blocks were taken at admission)
                self._sync_blocks()
                self.runner.copy_rows([first.slot] * len(others), [r.slot for r in others])
                for row in others:
                    row.length = first.length
            run.fresh = False
            rows += run.rows
            index += [first.slot] * len(run.rows)
        if rows:
            self._sample(logits, rows, index)

    def _decode_step(self) -> None:
        """Feed every decoding row its last sampled token; sample the next."""
        self._reserve_decode_blocks()
        rows = [row for run in self._running if not run.prefilling for row in run.live if row.pending is not None]
        if not rows:
            return
        self._sync_blocks()
        slots = torch.tensor([row.slot for row in rows])
        tokens = torch.zeros(self.config.slots, 1, dtype=torch.long)  # (slots, 1)
        tokens[slots, 0] = torch.tensor([row.pending for row in rows])
        active = torch.zeros(self.config.slots, dtype=torch.bool)  # (slots,) rows that decode this step
        active[slots] = True
        for row in rows:
            row.length += 1
        logits = self.runner.decode(tokens, active)
        self._sample(logits, rows, [row.slot for row in rows])

    # sampling ------------------------------------------------------------------------------------

    def _sample(self, logits: Tensor, rows: list[_Row], index: list[int]) -> None:
        """Sample rows[i] from logits[index[i]], grouped by sampling parameters; deliver the deltas."""
        owner = {row.slot: run for run in self._running for row in run.live}
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(_sampling_key(owner[row.slot].request.params), []).append(i)
        deltas: dict[int, list[SequenceDelta]] = {}
        for members in groups.values():
            params = owner[rows[members[0]].slot].request.params
            group = [rows[i] for i in members]
            picked = torch.tensor([index[i] for i in members], device=logits.device)
            for row, delta in zip(group, self._sample_group(logits[picked], params, group), strict=True):
                deltas.setdefault(owner[row.slot].request.id, []).append(delta)
        now = time.perf_counter()
        for run in list(self._running):
            if run.request.id not in deltas:
                continue
            run.request.timing.first_token = run.request.timing.first_token or now
            finished = all(row.done for row in run.rows)
            if finished:
                self._running.remove(run)
            deliver(run.request, Output(tuple(deltas[run.request.id]), finished=finished, time=now))

    def _sample_group(self, logits: Tensor, params: SamplingParams, rows: list[_Row]) -> list[SequenceDelta]:
        """logits: (len(rows), vocab) of rows sharing ``params``. Advances each row; frees finished ones."""
        slots = torch.tensor([row.slot for row in rows], device=logits.device)
        penalties = None
        if params.has_penalties:
            penalties = PenaltyState(self._penalties.prompt_mask[slots], self._penalties.output_counts[slots])
        out = sample(self.engine.mask_unused(logits), params, [row.generator for row in rows], penalties)
        if penalties is not None:
            self._penalties.output_counts[slots, out.tokens] += 1
        tokens = out.tokens.tolist()  # the host sync
        logprobs = [None] * len(rows)
        if out.logprobs is not None:
            top = zip(out.logprobs.tolist(), out.top_ids.tolist(), out.top_logprobs.tolist(), strict=True)
            logprobs = [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
                        for t, (c, i, v) in zip(tokens, top, strict=True)]
        deltas = []
        for row, token, logprob in zip(rows, tokens, logprobs, strict=True):
            text = row.seq.advance(token)
            row.generated.append(token)
            deltas.append(SequenceDelta(row.sample_index, 0, row.sample_index, token, text, logprob,
                                        row.seq.finish_reason))
            row.pending = None if row.seq.finish_reason else token
            if row.seq.finish_reason:
                row.done = True
                self._free_slot(row.slot)
        return deltas
