"""Many generation requests through one engine core, each result handed over as it finishes.

Evaluation submits thousands of sequences (64 samples of each of 30 problems, or a prompt per context
length and depth) with per-request seeds, more than fit in the cache at once, and wants each one as soon as
it is done, to write it down. `Engine.stream` sizes its core to hold every sequence of a call at once and
shares one `SamplingParams` (one seed) across prompts, so this module drives an `EngineCore` directly, the
way `Engine.stream` does: the requests wait in the core's FIFO queue and join the running batch at every
step as rows free up (continuous batching), and this loop only collects deltas. It is the same loop as the
server's and `Engine`'s, not a private one; nothing here touches the model.

Each `Job` is one request with ``params.n`` samples (the evaluations use n = 1: a request of n samples
waits for n free slots at once, which would hold back the whole batch behind its last sample).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from sambay.generate import Engine, SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.requests import Output, SchedulerConfig


@dataclass(frozen=True)
class Job:
    """One request: its prompt ids, its sampling parameters and a key to recognise its results by."""

    key: Hashable
    prompt: Sequence[int]
    params: SamplingParams


@dataclass
class Finished:
    """One finished sequence of a job."""

    key: Hashable
    sample_index: int  # within the job (0 .. params.n - 1)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def run_jobs(
    engine: Engine,
    jobs: Sequence[Job],
    on_finish: Callable[[Finished], None],
    *,
    slots: int,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """Generate every job through one `EngineCore` of ``slots`` rows; call ``on_finish`` per finished sequence.

    Args:
        engine: the model, tokenizer and default stop ids.
        jobs: the requests, queued in this order; each one's ``max_new_tokens`` is cut to what the model's
            ``max_seq_len`` leaves after its prompt.
        on_finish: called in this thread, in finishing order, once per sequence; an exception stops the run.
        slots: sequences decoded at once (rows of the cache).
        on_step: called after every step with the number of tokens it generated (progress).

    Raises:
        RuntimeError: a step failed in the model (the message names the error).
        ValueError: a prompt is empty, or leaves no room to generate.
    """
    if not jobs:
        return
    max_seq_len = engine.model.config.max_seq_len
    jobs = [_fit(job, max_seq_len) for job in jobs]
    max_length = max(len(j.prompt) + j.params.max_new_tokens for j in jobs)
    slots = max(min(slots, sum(j.params.n for j in jobs)), max(j.params.n for j in jobs))
    config = SchedulerConfig(slots=slots, max_length=max_length, prefill_chunk=8192, prefill_budget=8192,
                             max_waiting=len(jobs) + 1, cuda_graph=engine.cuda_graphs)
    core = EngineCore(engine, config)
    outputs: list[tuple[int, Output]] = []
    partial: dict[tuple[int, int], Finished] = {}
    for i, job in enumerate(jobs):  # an early exit (an exception, Ctrl-C) drops the core with its rows
        core.submit(job.prompt, job.params, lambda o, i=i: outputs.append((i, o)))
    while core.busy:
        core.step(overlap=True)
        step, tokens = outputs[:], 0
        outputs.clear()
        for i, output in step:
            if output.error:
                raise RuntimeError(f"generation failed: {output.error}")
            for d in output.deltas:
                seq = partial.setdefault((i, d.sample_index), Finished(jobs[i].key, d.sample_index))
                seq.token_ids.append(d.token_id)
                seq.text += d.text
                tokens += 1
                if d.finish_reason is not None:
                    seq.finish_reason = d.finish_reason
                    on_finish(partial.pop((i, d.sample_index)))
        if on_step is not None:
            on_step(tokens)


def _fit(job: Job, max_seq_len: int) -> Job:
    if not job.prompt:
        raise ValueError(f"job {job.key!r}: the prompt is empty")
    room = max_seq_len - len(job.prompt)
    if room < 1:
        raise ValueError(f"job {job.key!r}: a prompt of {len(job.prompt)} tokens leaves no room to generate "
                         f"(the model's max_seq_len is {max_seq_len})")
    if job.params.max_new_tokens <= room:
        return job
    return Job(job.key, job.prompt, job.params.replace(max_new_tokens=room))
