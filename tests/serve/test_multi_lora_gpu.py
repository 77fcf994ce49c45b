"""Several LoRA adapters served at once on a GPU: the mixed batch's decode steps replay the bucket CUDA graphs,
whose gathered LoRA matmul reads each row's adapter slot from the runner's static index (written before each
replay). Each request must get the tokens it gets alone from the model with its adapter merged (computed by
the CPU reference engine, as `tests/serve/test_multi_lora.py` does without graphs)."""

from __future__ import annotations

import copy

import pytest

from sambay.generate import Engine
from sambay.generate.core import EngineCore
from sambay.generate.requests import SchedulerConfig
from sambay.lora import attach_adapters
from sambay.ops import resolve_backend
from sambay.train.setup import use_ops
from tests.serve.test_multi_lora import alone, models, prompts, run  # noqa: F401  (models: the fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("overlap", [False, True])
def test_a_mixed_batch_in_cuda_graphs_gives_each_request_its_output_alone(models, overlap):  # noqa: F811
    base, adapters = models
    ps = prompts(9, seed=5)
    requests = [(p, i % 3) for i, p in enumerate(ps)]  # base, adapter 1, adapter 2, ...
    expected = [alone(base, None if a == 0 else adapters[a - 1], p) for p, a in requests]
    model = copy.deepcopy(base).to("cuda")
    attach_adapters(model, adapters)
    use_ops(model, resolve_backend("auto"))
    core = EngineCore(Engine(model), SchedulerConfig(slots=8, prefill_chunk=7, prefill_budget=14, block_size=16))
    assert core.runner._graphs and core.limits.adapters == 2
    assert run(core, requests, 2, overlap) == expected
