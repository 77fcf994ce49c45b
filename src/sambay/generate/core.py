"""The engine core: one generation loop for the server, the offline `Engine`, evaluation and benchmarks.

    submit() ─► Scheduler.schedule() ─► StepPlan ─► ModelRunner.execute() ─► logits ─► sample (GPU)
                      ▲                                                                    │
                      └──── Scheduler.update() ◄── OutputProcessor ◄── tokens to the host ◄┘ (one step later)

vLLM's V1 split, kept small: the `Scheduler` decides (pure policy), the `ModelRunner` is the only code
that touches the model and cache, the `OutputProcessor` turns tokens into deltas, and `EngineCore`
drives them and owns the sampler state (per-row generators, penalty statistics).

Asynchronous scheduling (on by default): the sampled tokens of step n are copied to the host without
blocking; step n+1 is planned and launched before the host waits for them, so detokenizing, stop checks
and delivery of step n overlap the GPU work of step n+1 (decode rows read their input token from the
device, where sampling left it). The cost: a row that stops at step n has decoded one more token,
which is dropped. Synchronous mode (``async_scheduling=False``, and every `step()` call) processes each
step's tokens before planning the next; both produce the same tokens (tested).

Token masks (reasoning budgets, grammars: `sambay.generate.constraints`) depend on a row's previous
token, which under asynchronous scheduling is still on its way when the next step is launched. Only the
sampling needs the mask; the forward needs only that token, which is already on the device. So a step
holding a row whose next token may be constrained launches its forward, then finishes the previous step
(reads its tokens back, delivers them, and so advances every guide) and computes all the step's masks
in one pass on the host (the grammar rows' on llguidance's threads, off the GIL) while the GPU runs the
forward, and only then queues the sampling. No speculation or rollback, and the GPU waits only if that
host work outlasts the forward (64 grammar rows' masks take about 1 ms, a decode step ~10 ms on an
H200). A step whose rows are all free is launched as before; a row with only a budget counts as free
until its budget is one token away. The masks are computed from the same state as in synchronous mode,
so the two still produce the same tokens.

Threads: `submit` and `cancel` may be called from any thread; one background thread runs the loop.
Outputs reach each request through its sink callback, called in the model thread. `close(grace)`
refuses new requests, lets admitted and waiting ones finish for ``grace`` seconds, then aborts the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sambay.generate.blocks import BlockPool, MemoryBudget, blocks_for, kv_blocks_for_budget, memory_budget
from sambay.generate.outputs import OutputProcessor, token_logprobs
from sambay.generate.requests import Limits, Output, Request, SchedulerConfig, deliver, refuse_if_busy
from sambay.generate.runner import ModelRunner, upload
from sambay.generate.sampling import PenaltyState, SamplingParams, apply_token_bitmask, make_generator, sample
from sambay.generate.scheduler import Run, Scheduler, Step
from sambay.model.sambay import SambaY

if TYPE_CHECKING:
    from sambay.generate.engine import Engine

log = logging.getLogger("sambay.core")


def make_runner(model: SambaY, config: SchedulerConfig, cls: type[ModelRunner] = ModelRunner) -> ModelRunner:
    """The runner (and cache) a core with ``config`` needs; ``cls`` may be a broadcasting subclass."""
    max_length = config.max_length or model.config.max_seq_len
    memory = memory_budget(model, config.slots, max_length, config.block_size, config.kv_blocks)
    if memory.kv_blocks and memory.kv_blocks < blocks_for(max_length, config.block_size):
        raise ValueError(f"the K/V pool holds {memory.kv_tokens} tokens, less than one sequence of "
                         f"max_length = {max_length}: give it more memory or lower max_length")
    # a model without per-row state (a Transformer++) would need no snapshots; its prefix cache is not built
    snapshots = config.prefix_cache_bytes // memory.bytes_per_slot if memory.kv_blocks and memory.bytes_per_slot else 0
    snapshots = min(snapshots, memory.kv_blocks)  # each snapshot needs a cached block of its own to be reachable
    return cls(model, slots=config.slots, max_length=max_length, block_size=config.block_size,
               kv_blocks=memory.kv_blocks or None, cuda_graph=config.cuda_graph, snapshots=snapshots,
               compile=config.compile, gemv=config.gemv)


def sized_for_budget(config: SchedulerConfig, model: SambaY, budget_bytes: int) -> SchedulerConfig:
    """``config`` with its K/V pool sized to a cache budget (`kv_blocks_for_budget`; ValueError if too small)."""
    max_length = config.max_length or model.config.max_seq_len
    kv_blocks = kv_blocks_for_budget(model, config.slots, max_length, config.block_size, budget_bytes)
    return dataclasses.replace(config, kv_blocks=kv_blocks)


def _sampling_key(p: SamplingParams) -> tuple:
    """Rows whose requests share these fields are sampled together."""
    return (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
            p.frequency_penalty, p.logprobs)


@dataclass
class _Launched:
    """A step whose device work is queued: its tokens are on their way to the host."""

    step: Step
    tokens: Tensor  # (len(samples),) int64, on the host once `ready` has fired
    logprobs: list[tuple[list[int], tuple[Tensor, Tensor, Tensor]]]  # (sample positions, host tensors)
    ready: torch.cuda.Event | None


class EngineCore:
    """Continuous batching over one model and one cache of ``config.slots`` rows (module docstring).

    Args:
        engine: the model, tokenizer and default stop ids (`Engine`).
        config: capacity, per-step bounds, asynchronous scheduling.
        runner: executes the plans, made by `make_runner` for the same config (default: a `ModelRunner`).
        on_step: called in the model thread after each iteration of the loop (e.g. to send the
            step's outputs on in one message).
    """

    def __init__(self, engine: Engine, config: SchedulerConfig | None = None, runner: ModelRunner | None = None,
                 on_step: Callable[[], None] | None = None):
        self.engine, self.model, self.config = engine, engine.model, config or SchedulerConfig()
        self.on_step = on_step
        self.runner = runner or make_runner(self.model, self.config)
        c, self.max_length = self.config, self.runner.cache.max_length
        self.memory: MemoryBudget = memory_budget(self.model, c.slots, self.max_length, c.block_size, c.kv_blocks)
        self.blocks = BlockPool(self.runner.cache)
        self.outputs = OutputProcessor(engine.tokenizer, engine.stop_token_ids)
        self.scheduler = Scheduler(c, self.blocks, self.outputs, self.max_length,
                                   lambda seed: make_generator(seed, self.runner.device),
                                   snapshots=self.runner.snapshots.entries)
        if self.scheduler.prefix is not None:
            pool = self.runner.snapshots
            log.info("prefix cache: %d state snapshots of %.1f MB (%.2f GB), K/V blocks shared from the pool",
                     pool.entries, pool.entry_bytes / 1e6, pool.nbytes / 1e9)
        self._ids = itertools.count()
        self._penalties: PenaltyState | None = None  # (slots + 1, vocab), allocated on first use
        self._cancelled: set[int] = set()
        self._lock = threading.Condition()
        self._closing = self._stop = False
        self._thread: threading.Thread | None = None
        self._inflight: _Launched | None = None
        if c.warm_up if c.warm_up is not None else self.runner.device.type == "cuda":
            seconds = self.runner.warm_up(c.prefill_chunk, c.prefill_budget)
            log.info("warm-up: prefill kernels compiled in %.1f s", seconds)

    # public, thread-safe -------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """True once `close` has been called: new requests are refused."""
        return self._closing

    @property
    def limits(self) -> Limits:
        """What a request may ask of this core (checked at `submit`)."""
        return Limits(vocab_size=self.model.config.vocab_size, max_length=self.max_length, slots=self.config.slots,
                      block_size=self.blocks.block_size, kv_blocks=self.blocks.capacity if self.blocks.paged else 0,
                      adapters=self.runner.adapters)

    def stats(self) -> dict[str, int]:
        """Requests running and waiting (preempted ones included), free slots and K/V blocks, and the prefix
        cache's counters (prompt tokens looked up and served from it, snapshot entries in use)."""
        s = self.scheduler
        with self._lock:
            prefix = s.prefix
            return {"running": len(s.running), "waiting": len(s.waiting) + len(s.preempted),
                    "free_slots": len(s.free), "free_blocks": self.blocks.free_blocks, "preemptions": s.preemptions,
                    "prefix_cache_queries": prefix.queries if prefix else 0,
                    "prefix_cache_hits": prefix.hits if prefix else 0,
                    "prefix_cache_snapshots": prefix.snapshots if prefix else 0,
                    "prefix_cache_entries": prefix.entries if prefix else 0}

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Output], None],
               adapter: int = 0) -> Request:
        """Queue a request; its outputs go to ``sink`` (called in the model thread). ``adapter`` is the slot of
        the LoRA adapter it runs with (`sambay.lora.attach_adapters`; 0: the base model).

        Raises:
            PromptTooLong, ValueError: the request can never run. QueueFull, SchedulerClosed: not now.
        """
        prompt = [int(i) for i in prompt]
        self.limits.check(prompt, params, adapter)
        self.outputs.check(params)  # a grammar that cannot be used, before it is queued
        request = Request(self, prompt, params, sink, adapter)
        with self._lock:
            refuse_if_busy(self._closing, len(self.scheduler.waiting), self.config.max_waiting)
            self.scheduler.waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` and free its slots at the next step boundary."""
        with self._lock:
            self._cancelled.add(request.id)
            self._lock.notify_all()

    def start(self) -> EngineCore:
        """Run the loop in a background thread; returns self."""
        self._thread = threading.Thread(target=self._loop, name="sambay-engine-core", daemon=True)
        self._thread.start()
        return self

    def close(self, grace: float = 30.0) -> None:
        """Refuse new requests, let the admitted and waiting ones finish for ``grace`` s, abort the rest."""
        deadline = time.monotonic() + grace
        with self._lock:
            self._closing = True
            while self._thread is not None and self.busy and time.monotonic() < deadline:
                self._lock.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0)))
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._abort_all("the server shut down before the request finished")

    # the loop -------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Requests running, waiting or preempted, or a launched step not yet delivered."""
        return self.scheduler.busy or self._inflight is not None

    def _loop(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)  # the current device is per thread
        while True:
            with self._lock:
                while not (self._stop or self.busy or self._cancelled):
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self._iterate(self.config.async_scheduling)
            except Exception as e:  # a failed step must not take the server down: fail its requests
                log.exception("engine step failed")
                self._inflight = None
                self._abort_all(f"internal error: {type(e).__name__}: {e}")
            if self.on_step is not None:
                self.on_step()
            with self._lock:
                self._lock.notify_all()  # wakes `close` waiting for the batch to drain

    def step(self, overlap: bool = False) -> None:
        """One iteration of the loop, in the caller's thread: plan, run and sample a step, then deliver its
        outputs (``overlap``: deliver the previous step's instead, as the asynchronous loop does)."""
        self._iterate(overlap)

    def _iterate(self, overlap: bool) -> None:
        """Launch the next step; deliver the previous one's outputs (``overlap``) or this one's."""
        self._apply_cancellations()
        with self._lock:
            step = self.scheduler.schedule()
        launched = self._launch(step) if step.samples or not step.plan.is_empty else None
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._finish(previous)
        if not overlap and self._inflight is not None:
            launched, self._inflight = self._inflight, None
            self._finish(launched)

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = self.scheduler.cancel(cancelled) if cancelled else []
        for request in dropped:
            deliver(request, Output((), finished=True))

    def _abort_all(self, message: str) -> None:
        with self._lock:
            requests = self.scheduler.drain()
        for request in requests:
            deliver(request, Output((), finished=True, error=message))

    # one step -------------------------------------------------------------------------------------

    def _launch(self, step: Step) -> _Launched:
        """Queue the step's device work: the forwards, then sampling; start the tokens' copy to the host.
        Between the two, the token masks (which may first finish the previous step: module docstring)."""
        now = time.perf_counter()
        for run in step.admitted:
            run.request.timing.admitted = run.request.timing.admitted or now
            if run.request.params.has_penalties:
                self._init_penalties(run)
            for row in run.rows:
                self.outputs.begin(row.seq, run.request.prompt)
        with torch.inference_mode():
            logits = self.runner.execute(step.plan)
            return self._sample(logits, step, self._masks(step))

    def _masks(self, step: Step) -> tuple[list[int], np.ndarray] | None:
        """The step's token masks (`OutputProcessor.bitmask`), from guides that have seen every token."""
        def guides():
            return [None if s.run.closed or s.row.done else s.row.seq.guide for s in step.samples]

        if not self.outputs.may_constrain(guides()):
            return None
        if self._inflight is not None:  # the previous step's tokens first, while the forward runs
            previous, self._inflight = self._inflight, None
            self._finish(previous)
        return self.outputs.bitmask(guides())

    def _sample(self, logits: Tensor | None, step: Step, masks: tuple[list[int], np.ndarray] | None) -> _Launched:
        """Sample every row of the step, grouped by parameters, masks applied; tokens go to the runner and
        to the host."""
        device = self.runner.device
        tokens = torch.empty(len(step.samples), dtype=torch.long, device=device)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(step.samples):
            groups.setdefault(_sampling_key(s.run.request.params), []).append(i)
        where, bits = ({}, None) if masks is None else ({p: r for r, p in enumerate(masks[0])},
                                                          upload(torch.from_numpy(masks[1]), device))
        logprobs = []
        for members in groups.values():
            samples = [step.samples[i] for i in members]
            params = samples[0].run.request.params
            picked = upload([s.index for s in samples], device)
            slots = upload([s.row.slot for s in samples], device)
            penalties = None
            if params.has_penalties:
                penalties = PenaltyState(self._penalties.prompt_mask[slots], self._penalties.output_counts[slots])
            rows = self.engine.mask_unused(logits[picked])  # (len(members), vocab), a new tensor
            masked = [(j, where[i]) for j, i in enumerate(members) if i in where]
            if masked:
                at = upload([j for j, _ in masked], device)
                rows[at] = apply_token_bitmask(rows[at], bits[upload([r for _, r in masked], device)])
            out = sample(rows, params, [s.row.generator for s in samples], penalties)
            if penalties is not None:
                self._penalties.output_counts[slots, out.tokens] += 1
            tokens[upload(members, device)] = out.tokens
            self.runner.set_tokens(slots, out.tokens)
            if out.logprobs is not None:
                logprobs.append((members, tuple(t.to("cpu", non_blocking=True)
                                                for t in (out.logprobs, out.top_ids, out.top_logprobs))))
        if device.type != "cuda":
            return _Launched(step, tokens, logprobs, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)  # page-locked: a truly async copy
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(step, host, logprobs, ready)

    def _finish(self, launched: _Launched) -> None:
        """Wait for a launched step's tokens; turn them into outputs and deliver them."""
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens = launched.tokens.tolist()
        logprobs = None
        if launched.logprobs:
            logprobs = [None] * len(tokens)
            for members, (chosen, top_ids, top_values) in launched.logprobs:
                rows = token_logprobs([tokens[i] for i in members], chosen.tolist(), top_ids.tolist(),
                                      top_values.tolist())
                for i, lp in zip(members, rows, strict=True):
                    logprobs[i] = lp
        with self._lock:
            outputs = self.scheduler.update(launched.step, tokens, logprobs)
        now = time.perf_counter()
        for request, output in outputs:
            request.timing.first_token = request.timing.first_token or now
            deliver(request, output)

    def _init_penalties(self, run: Run) -> None:
        if self._penalties is None:
            shape, device = (self.config.slots + 1, self.model.config.vocab_size), self.runner.device
            self._penalties = PenaltyState(torch.zeros(shape, dtype=torch.bool, device=device),
                                           torch.zeros(shape, dtype=torch.int32, device=device))
        prompt = upload(run.request.prompt, self.runner.device)
        for row in run.live:
            self._penalties.prompt_mask[row.slot] = False
            self._penalties.prompt_mask[row.slot, prompt] = True
            counts = torch.bincount(torch.tensor(row.generated, dtype=torch.long),
                                    minlength=self.model.config.vocab_size)
            self._penalties.output_counts[row.slot] = upload(counts.to(torch.int32), self.runner.device)


__all__ = ["EngineCore", "make_runner", "sized_for_budget"]
