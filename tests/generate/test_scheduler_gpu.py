"""The continuous-batching scheduler on a GPU: the CUDA-graph decode step over the paged cache gives the
eager reference's tokens, alone, among others and through preemption."""

from __future__ import annotations

import pytest
import torch

import sambay
from sambay.generate import Engine, SamplingParams
from sambay.generate.scheduler import Scheduler, SchedulerConfig
from tests.conftest import TINY_FIXTURE

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=())


def _run(scheduler: Scheduler, prompts: list[list[int]]) -> list[list[int]]:
    out = [[] for _ in prompts]
    done = [False] * len(prompts)

    def sink(i):
        def put(output):
            out[i] += [d.token_id for d in output.deltas]
            done[i] = done[i] or output.finished
        return put

    for i, prompt in enumerate(prompts):
        scheduler.submit(prompt, GREEDY, sink(i))
        scheduler.step()
    while not all(done):
        scheduler.step()
    return out


def test_graphed_scheduler_equals_reference_engine():
    gpu = sambay.load_model(TINY_FIXTURE / "checkpoint", device="cuda", dtype=torch.float32, progress=False)
    ref = sambay.load_model(TINY_FIXTURE / "checkpoint", dtype=torch.float32, backend="reference", progress=False)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 37, 12, 60, 3)]
    expected = [Engine(ref).generate([p], GREEDY)[0][0].token_ids for p in prompts]
    config = SchedulerConfig(slots=4, max_length=128, block_size=16, kv_blocks=14, prefill_chunk=16)
    scheduler = Scheduler(Engine(gpu), config)
    assert scheduler.runner._graph is not None
    assert _run(scheduler, prompts) == expected
    assert scheduler.preemptions > 0
