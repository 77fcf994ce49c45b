"""What a caller of the continuous-batching scheduler sees: its configuration, requests, outputs and refusals.

Kept apart from the engine core (`sambay.generate.core`) and its scheduling policy (`sambay.generate.scheduler`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sambay.generate.blocks import blocks_for
from sambay.generate.outputs import SequenceDelta
from sambay.generate.sampling import SamplingParams

if TYPE_CHECKING:
    from sambay.generate.core import EngineCore

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
    max_length: int | None = None  # prompt + completion tokens per sequence; None: the model's max_seq_len
    block_size: int = 128  # tokens per block of the paged shared K/V (a power of two >= 16)
    kv_blocks: int | None = None  # blocks in the pool; None: every slot can reach max_length (no preemption)
    prefill_chunk: int = 512  # prompt tokens one request consumes per step while other rows decode
    prefill_budget: int = 2048  # prompt tokens all requests consume per step (>= prefill_chunk)
    max_waiting: int = 64  # requests queued for a slot before `submit` raises QueueFull
    cuda_graph: bool = True  # on a GPU, replay decode steps from CUDA graphs (one per batch bucket)
    compile: bool = False  # torch.compile the decode step before capturing it (`ModelRunner`'s ``compile``)
    gemv: bool = True  # on a GPU, batch-1 projections on our GEMV kernel, not cuBLAS (`ModelRunner`'s ``gemv``)
    async_scheduling: bool = True  # plan and launch step n+1 before the host processes step n's tokens
    warm_up: bool | None = None  # compile the prefill kernels at start; None: on a GPU only
    prefix_cache_bytes: int = 0  # memory for prefix-cache state snapshots (`prefix_cache`); 0: no prefix cache

    def __post_init__(self):
        for name in ("slots", "prefill_chunk", "max_waiting", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.prefill_budget < self.prefill_chunk:
            raise ValueError(f"prefill_budget ({self.prefill_budget}) must be >= prefill_chunk ({self.prefill_chunk})")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if not isinstance(self.prefix_cache_bytes, int) or self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be an int >= 0, got {self.prefix_cache_bytes!r}")
        if self.kv_blocks is not None and (not isinstance(self.kv_blocks, int) or self.kv_blocks < 1):
            raise ValueError(f"kv_blocks must be an int >= 1, got {self.kv_blocks!r}")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What a request may ask of a scheduler: `check` refuses what could never run."""

    vocab_size: int
    max_length: int  # prompt + completion tokens per sequence
    slots: int
    block_size: int
    kv_blocks: int  # blocks of the paged shared K/V (0: nothing paged)
    adapters: int = 0  # LoRA adapters served beside the base model (request slots 1..adapters)

    def check(self, prompt: list[int], params: SamplingParams, adapter: int = 0) -> None:
        """Raises PromptTooLong or ValueError (with the reason) for a request that can never run."""
        if not 0 <= adapter <= self.adapters:
            raise ValueError(f"LoRA adapter slot {adapter} does not exist (this server has {self.adapters})")
        vocab = self.vocab_size
        if not prompt or not all(0 <= i < vocab for i in prompt):
            raise ValueError(f"the prompt must hold at least one token id, each in [0, {vocab})")
        if len(prompt) >= self.max_length:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens but a sequence holds at most "
                                f"{self.max_length} (prompt + completion)")
        if params.n > self.slots:
            raise ValueError(f"n = {params.n} samples need more slots than the server has ({self.slots})")
        if self.kv_blocks:  # every sample must be able to reach its length limit, even alone
            tokens = min(len(prompt) + params.max_new_tokens, self.max_length)
            need = params.n * blocks_for(tokens, self.block_size)
            if need > self.kv_blocks:
                raise ValueError(f"n = {params.n} samples of up to {tokens} tokens need {need} K/V blocks but the "
                                 f"server holds {self.kv_blocks} ({self.kv_blocks * self.block_size} tokens): "
                                 "lower max_tokens or n")


def refuse_if_busy(closing: bool, waiting: int, max_waiting: int) -> None:
    """Raises SchedulerClosed while shutting down, QueueFull when ``waiting`` requests already wait (the
    checks `submit` makes under its lock, in the core and in its stand-in for another process)."""
    if closing:
        raise SchedulerClosed("the server is shutting down")
    if waiting >= max_waiting:
        raise QueueFull(f"server overloaded: {waiting} requests are already waiting")


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
    """A submitted request: its prompt, parameters, sink, LoRA adapter slot (0: the base model) and timing;
    `cancel` frees its slots."""

    def __init__(self, scheduler: EngineCore, prompt: list[int], params: SamplingParams,
                 sink: Callable[[Output], None], adapter: int = 0):
        self.id = next(scheduler._ids)
        self.prompt, self.params, self.sink, self.adapter = prompt, params, sink, adapter
        self.timing = Timing()
        self._scheduler = scheduler

    def cancel(self) -> None:
        """Stop generating; the slots are freed at the next step boundary (safe from any thread)."""
        self._scheduler.cancel(self)


def deliver(request: Request, output: Output) -> None:
    """Call the request's sink; a failing sink cancels the request instead of stopping the loop."""
    try:
        request.sink(output)
    except Exception:
        log.exception("output sink of request %d failed; cancelling it", request.id)
        if not output.finished:
            request.cancel()

