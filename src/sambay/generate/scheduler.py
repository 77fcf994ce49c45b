"""Continuous batching: requests join and leave the running batch at every step, each in its own cache slot.

    submit() ─► waiting (bounded FIFO) ─admit─► slots: rows of ONE SambaYCache ─finish / cancel─► free
                                                   │ every step, in the model thread:
                                                   ├─ prefill: at most `prefill_budget` prompt tokens, at
                                                   │  most `prefill_chunk` per request (one ragged forward)
                                                   └─ decode: one token for every running row (one forward)

A slot is a row of the hybrid state: the Mamba conv/SSM states, the sliding-window rings and the shared
(full-attention) K/V. The model's ``lengths=`` argument lets rows at different points of their sequence,
and idle rows (length 0, state untouched), share one forward; each row continues its own sequence.

Notable features:
- Memory is decided at start: ``slots`` rows × ``max_length`` tokens (`MemoryBudget`; `slots_for_budget`
  turns a byte budget into a slot count). Admission is by free slots: a request with n samples takes n
  rows, prefills its prompt once in the first and fans it out with `SambaYCache.copy_rows`.
- Known limitation: the shared K/V is allocated per slot at ``max_length`` whatever the request's actual
  length, so memory follows the slot count, not the tokens in flight. A paged layout (vLLM's
  PagedAttention: fixed-size blocks handed out as sequences grow, a per-row block table read by the
  attention kernels) would admit requests by free blocks instead and let short requests pack densely;
  the Mamba and sliding-window states are constant-size per row and would stay slot-allocated.
- Decode latency stays bounded while long prompts arrive: a step prefills at most `prefill_budget`
  prompt tokens, in chunks of at most `prefill_chunk` per request (the model's chunked prefill).
- Batch invariance: prefill forwards span all slots with per-row ``lengths``; decode forwards take the
  model's static decode path (one token per slot, ``active`` marking the rows that advance: no host
  sync, so a GPU can run ahead and a CUDA graph can capture it), whatever the other slots are doing.
  A request's chunk boundaries depend on that request alone, so its arithmetic does not depend on its
  neighbours: greedy output is the same alone or among others (tested, with staggered arrivals).
  Sampling is grouped by parameters; each row draws from its own generator (``seed + j``).
- A new request's slot is reset by `reset_rows`: Mamba conv/SSM states zeroed, ``seqlens`` 0 (attention
  caches are addressed by position from ``seqlens``, so their stale entries are never read).
- Threads: `submit` and `cancel` may be called from any thread; one background thread runs the model.
  Outputs reach each request through its sink callback, called in the model thread
  (`sambay.serve.streams.AsyncStream` adapts that to asyncio). Cancellation frees the slots at the next step boundary.
- `close(grace)` refuses new requests, lets admitted and waiting ones finish for ``grace`` seconds, then
  aborts the rest with an error output.
- Known limitation: idle rows still occupy the forward's batch dimension (static shapes, as CUDA graphs
  want); packing only the active rows would save compute at low occupancy.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sambay.cache import SambaYCache
from sambay.generate.engine import Engine, SequenceDelta, SequenceState, TokenLogprob
from sambay.generate.sampling import PenaltyState, SamplingParams, make_generator, sample
from sambay.model.sambay import SambaY

log = logging.getLogger("sambay.scheduler")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: retry later."""


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new requests."""


class PromptTooLong(ValueError):
    """The prompt does not fit a slot (``max_length`` tokens, one of them for the completion)."""


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Capacity and per-step work bounds of a `Scheduler`."""

    slots: int = 8  # rows of the cache: sequences decoded together
    max_length: int | None = None  # prompt + completion tokens per slot; None: the model's max_seq_len
    prefill_chunk: int = 256  # prompt tokens one request consumes per step
    prefill_budget: int = 1024  # prompt tokens all requests consume per step (>= prefill_chunk)
    max_waiting: int = 64  # requests queued for a slot before `submit` raises QueueFull

    def __post_init__(self):
        for name in ("slots", "prefill_chunk", "max_waiting"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.prefill_budget < self.prefill_chunk:
            raise ValueError(f"prefill_budget ({self.prefill_budget}) must be >= prefill_chunk ({self.prefill_chunk})")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass(frozen=True)
class MemoryBudget:
    """What the cache holds, decided at start."""

    slots: int
    max_length: int  # tokens per slot
    bytes_per_slot: int  # Mamba + sliding-window states (constant) + shared K/V at max_length

    @property
    def total_bytes(self) -> int:
        return self.slots * self.bytes_per_slot


def slot_bytes(model: SambaY, max_length: int) -> int:
    """Cache bytes of one slot of ``max_length`` tokens (measured on the meta device: nothing is allocated)."""
    return model.new_cache(batch_size=1, max_length=max_length, device="meta").nbytes


def slots_for_budget(model: SambaY, max_length: int, budget_bytes: int) -> int:
    """How many slots of ``max_length`` tokens fit in ``budget_bytes`` of cache (at least 1)."""
    return max(1, budget_bytes // slot_bytes(model, max_length))


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


@dataclass(frozen=True)
class Output:
    """What one step produced for one request, delivered to its sink."""

    deltas: tuple[SequenceDelta, ...]  # one per sample that advanced (``index`` = sample index)
    finished: bool = False  # the request's last output
    error: str | None = None  # set when the request was aborted (shutdown, model failure)
    time: float = field(default_factory=time.perf_counter)


@dataclass
class Timing:
    """Wall-clock marks of one request (``time.perf_counter`` seconds)."""

    arrival: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None


class Request:
    """A submitted request: its prompt, parameters, sink and timing; `cancel` frees its slots."""

    def __init__(self, scheduler: Scheduler, prompt: list[int], params: SamplingParams, sink: Callable[[Output], None]):
        self.id = next(scheduler._ids)
        self.prompt, self.params, self.sink = prompt, params, sink
        self.timing = Timing()
        self._scheduler = scheduler

    def cancel(self) -> None:
        """Stop generating; the slots are freed at the next step boundary (safe from any thread)."""
        self._scheduler.cancel(self)


@dataclass
class _Row:
    """One sample of a running request in its slot."""

    slot: int
    sample_index: int
    seq: SequenceState
    generator: torch.Generator
    pending: int | None = None  # sampled token not yet fed to the model
    done: bool = False


@dataclass
class _Running:
    """An admitted request: prefill progress and its rows."""

    request: Request
    rows: list[_Row]
    prompt: Tensor  # (t,) int64 on the CPU
    consumed: int = 0  # prompt tokens already prefilled

    @property
    def prefilling(self) -> bool:
        return self.consumed < self.prompt.numel()


def _sampling_key(p: SamplingParams) -> tuple:
    """Rows whose requests share these fields are sampled together."""
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.logprobs)


class Scheduler:
    """Continuous batching over one model and one cache of ``config.slots`` rows (module docstring).

    Args:
        engine: the model, tokenizer and default stop ids (`Engine`).
        config: capacity and per-step bounds.
    """

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None):
        self.engine, self.model, self.config = engine, engine.model, config or SchedulerConfig()
        self.max_length = self.config.max_length or self.model.config.max_seq_len
        self.cache = self.model.new_cache(batch_size=self.config.slots, max_length=self.max_length)
        self.memory = MemoryBudget(self.config.slots, self.max_length, self.cache.nbytes // self.config.slots)
        self._ids = itertools.count()
        self._free = list(range(self.config.slots))
        self._running: list[_Running] = []
        self._waiting: deque[Request] = deque()
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
        """Requests running and waiting, and free slots."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "free_slots": len(self._free)}

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
        vocab = self.model.config.vocab_size
        if not prompt or not all(0 <= i < vocab for i in prompt):
            raise ValueError(f"the prompt must hold at least one token id, each in [0, {vocab})")
        if len(prompt) >= self.max_length:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens but a sequence holds at most "
                                f"{self.max_length} (prompt + completion)")
        if params.n > self.config.slots:
            raise ValueError(f"n = {params.n} samples need more slots than the server has ({self.config.slots})")
        request = Request(self, prompt, params, sink)
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(f"server overloaded: {len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

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
            while self._thread is not None and (self._running or self._waiting) and time.monotonic() < deadline:
                self._lock.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0)))
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._abort_all("the server shut down before the request finished")

    # the model loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._waiting or self._running or self._cancelled):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step must not take the server down: fail its requests
                log.exception("scheduler step failed")
                self._abort_all(f"internal error: {type(e).__name__}: {e}")
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
            requests = [run.request for run in self._running] + list(self._waiting)
            self._waiting.clear()
        for run in list(self._running):
            self._release(run)
        for request in requests:
            _deliver(request, Output((), finished=True, error=message))

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r.id in cancelled]
            for request in dropped:
                self._waiting.remove(request)
        for run in [run for run in self._running if run.request.id in cancelled]:
            self._release(run)
            dropped.append(run.request)
        for request in dropped:
            _deliver(request, Output((), finished=True))

    def _release(self, run: _Running) -> None:
        """Free every slot of ``run`` and forget it."""
        for row in run.rows:
            if not row.done:
                row.done = True
                self._free.append(row.slot)
        self._free.sort()
        self._running.remove(run)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or len(self._free) < self._waiting[0].params.n:
                    return
                request = self._waiting.popleft()
            slots, self._free = self._free[: request.params.n], self._free[request.params.n :]
            reset_rows(self.cache, slots)
            self._running.append(self._start(request, slots))

    def _start(self, request: Request, slots: list[int]) -> _Running:
        """Host-side state of a newly admitted request in ``slots``."""
        params, engine = request.params, self.engine
        request.timing.admitted = time.perf_counter()
        stop_ids = frozenset(engine.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids)
        limit = min(params.max_new_tokens, self.max_length - len(request.prompt))
        device = self.model.device
        rows = [_Row(slot, j, SequenceState(engine.tokenizer, params, stop_ids, limit),
                     make_generator(None if params.seed is None else params.seed + j, device))
                for j, slot in enumerate(slots)]
        prompt = torch.tensor(request.prompt, dtype=torch.long)
        if params.has_penalties:
            self._init_penalties(slots, prompt.to(device))
        return _Running(request, rows, prompt)

    def _init_penalties(self, slots: list[int], prompt: Tensor) -> None:
        if self._penalties is None:
            shape, device = (self.config.slots, self.model.config.vocab_size), self.model.device
            self._penalties = PenaltyState(torch.zeros(shape, dtype=torch.bool, device=device),
                                           torch.zeros(shape, dtype=torch.int32, device=device))
        for slot in slots:
            self._penalties.prompt_mask[slot] = False
            self._penalties.prompt_mask[slot, prompt] = True
            self._penalties.output_counts[slot] = 0

    def _prefill_step(self) -> None:
        """Consume the next prompt chunk of prefilling requests, FIFO, within the per-step budget."""
        chosen, budget = [], self.config.prefill_budget
        for run in self._running:
            take = min(self.config.prefill_chunk, run.prompt.numel() - run.consumed)
            if run.prefilling and take <= budget:
                chosen.append((run, take))
                budget -= take
        if not chosen:
            return
        tokens = torch.zeros(self.config.slots, max(take for _, take in chosen), dtype=torch.long)  # (slots, t)
        lengths = torch.zeros(self.config.slots, dtype=torch.long)  # (slots,) idle rows: 0
        for run, take in chosen:
            slot = run.rows[0].slot
            tokens[slot, :take] = run.prompt[run.consumed : run.consumed + take]
            lengths[slot] = take
            run.consumed += take
        logits = self._forward(tokens, lengths)
        rows, index = [], []
        for run, _ in chosen:
            if run.prefilling:
                continue
            first, others = run.rows[0].slot, [r.slot for r in run.rows[1:]]
            if others:  # n samples: fan the prefilled row out
                self.cache.copy_rows([first] * len(others), others)
            rows += run.rows
            index += [first] * len(run.rows)
        if rows:
            self._sample(logits, rows, index)

    def _decode_step(self) -> None:
        """Feed every running row its last sampled token; sample the next."""
        rows = [row for run in self._running for row in run.rows if row.pending is not None]
        if not rows:
            return
        tokens = torch.zeros(self.config.slots, 1, dtype=torch.long)  # (slots, 1)
        active = torch.zeros(self.config.slots, dtype=torch.bool)  # (slots,) rows that decode this step
        for row in rows:
            tokens[row.slot, 0], active[row.slot] = row.pending, True
        device = self.model.device
        # the static, sync-free decode path, whatever the other slots are doing: only `active` rows advance
        logits = self.model(tokens.to(device), self.cache, active=active.to(device), check_inputs=False)
        self._sample(logits[:, -1], rows, [row.slot for row in rows])

    def _forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """(slots, t) tokens, (slots,) lengths → (slots, vocab) logits of each row's last valid token.

        Inputs are checked at `submit` and the slot limit caps generation, hence ``check_inputs=False``."""
        device = self.model.device
        logits = self.model(tokens.to(device), self.cache, lengths=lengths.to(device), check_inputs=False)
        return logits[:, -1]

    def _sample(self, logits: Tensor, rows: list[_Row], index: list[int]) -> None:
        """Sample rows[i] from logits[index[i]], grouped by sampling parameters; deliver the deltas."""
        owner = {row.slot: run for run in self._running for row in run.rows}
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
            _deliver(run.request, Output(tuple(deltas[run.request.id]), finished=finished, time=now))

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
            deltas.append(SequenceDelta(row.sample_index, 0, row.sample_index, token, text, logprob,
                                        row.seq.finish_reason))
            row.pending = None if row.seq.finish_reason else token
            if row.seq.finish_reason:
                row.done = True
                self._free.append(row.slot)
        self._free.sort()
        return deltas


def _deliver(request: Request, output: Output) -> None:
    """Call the request's sink; a failing sink cancels the request instead of stopping the loop."""
    try:
        request.sink(output)
    except Exception:
        log.exception("output sink of request %d failed; cancelling it", request.id)
        if not output.finished:
            request.cancel()

