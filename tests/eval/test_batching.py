"""Many requests through one engine core with fewer slots than requests: each result is what the request
gives alone through `Engine`, and handed over once, as it finishes."""

from __future__ import annotations

import pytest
import torch

from sambay.eval.batching import Job, run_jobs
from sambay.generate import Engine, SamplingParams
from tests.conftest import random_model, small_config


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(random_model(small_config(vocab_size=97, max_seq_len=64)), stop_token_ids=[3])


def test_results_equal_each_request_alone(engine):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 14, 7)]
    params = [SamplingParams(temperature=0, max_new_tokens=12),
              SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10, seed=11),
              SamplingParams(temperature=1.0, max_new_tokens=16, seed=3),
              SamplingParams(temperature=0, max_new_tokens=6),
              SamplingParams(temperature=1.0, max_new_tokens=8, seed=4, n=2)]
    finished, steps = [], []
    run_jobs(engine, [Job(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))],
             finished.append, slots=2, on_step=steps.append)
    assert sorted((f.key, f.sample_index) for f in finished) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 1)]
    for f in finished:
        alone = engine.generate([prompts[f.key]], params[f.key])[0][f.sample_index]
        assert f.token_ids == alone.token_ids and f.finish_reason == alone.finish_reason
    assert sum(steps) == sum(len(f.token_ids) for f in finished)


def test_budget_is_cut_to_the_models_length(engine):
    finished = []
    run_jobs(engine, [Job("long", list(range(4, 60)), SamplingParams(temperature=0, max_new_tokens=100,
                                                                   stop_token_ids=()))], finished.append, slots=4)
    (only,) = finished
    assert len(only.token_ids) == 64 - 56 and only.finish_reason == "length"


def test_prompts_that_cannot_run_are_refused(engine):
    with pytest.raises(ValueError, match="empty"):
        run_jobs(engine, [Job("x", [], SamplingParams())], print, slots=1)
    with pytest.raises(ValueError, match="no room"):
        run_jobs(engine, [Job("x", list(range(64)), SamplingParams())], print, slots=1)
