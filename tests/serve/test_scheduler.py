"""The continuous-batching scheduler on a tiny random model, driven step by step (no threads, no HTTP):
batch invariance with staggered arrivals, n-sample fan-out, chunked prefill bounds, cancellation,
admission and queue limits, slot reset, paged K/V blocks and preemption, shutdown."""

from __future__ import annotations

import queue

import pytest
import torch

from sambay.generate import Engine, SamplingParams
from sambay.generate.blocks import kv_blocks_for_budget
from sambay.generate.core import EngineCore
from sambay.generate.requests import PromptTooLong, QueueFull, SchedulerClosed, SchedulerConfig
from tests.conftest import random_model, small_config

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return Engine(random_model(small_config()))


def prompts(count: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


class Collector:
    """A sink that gathers each request's tokens per sample."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.finished = False
        self.error = None
        self.reasons: dict[int, str] = {}

    def __call__(self, output):
        for d in output.deltas:
            self.tokens.setdefault(d.sample_index, []).append(d.token_id)
            if d.finish_reason:
                self.reasons[d.sample_index] = d.finish_reason
        self.finished, self.error = output.finished, output.error


def run_staggered(scheduler: EngineCore, requests: list[tuple[list[int], SamplingParams]], every: int,
                  overlap: bool = False):
    """Submit one request every ``every`` steps; step (asynchronously with ``overlap``) until all finish."""
    sinks, pending, step = [], list(requests), 0
    while pending or not all(s.finished for s in sinks):
        if pending and step % every == 0:
            sinks.append(Collector())
            scheduler.submit(*pending.pop(0), sinks[-1])
        scheduler.step(overlap)
        step += 1
        assert step < 2000
    return sinks


def config(**overrides) -> SchedulerConfig:
    return SchedulerConfig(**{"slots": 4, "prefill_chunk": 7, "prefill_budget": 14, "block_size": 16, **overrides})


@pytest.mark.parametrize("every", [1, 3])
def test_greedy_output_is_the_same_alone_and_among_others(engine, every):
    ps = prompts(10)
    alone = [engine.generate([p], GREEDY)[0][0].token_ids for p in ps]
    together = run_staggered(EngineCore(engine, config()), [(p, GREEDY) for p in ps], every)
    assert [s.tokens[0] for s in together] == alone
    assert all(s.reasons[0] == "length" for s in together)


def test_seeded_sampling_is_the_same_alone_and_among_others(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=8, presence_penalty=0.5)
    p = prompts(1, seed=5)[0]
    alone = run_staggered(EngineCore(engine, config()), [(p, params)], 1)[0].tokens
    mixed = run_staggered(EngineCore(engine, config()), [(q, GREEDY) for q in prompts(3)] + [(p, params)], 1)[-1]
    assert mixed.tokens == alone


def test_n_samples_fan_out_from_one_prefill(engine):
    p = prompts(1)[0]
    [sink] = run_staggered(EngineCore(engine, config()), [(p, GREEDY.replace(n=3))], 1)
    reference = engine.generate([p], GREEDY)[0][0].token_ids
    assert sink.tokens == {0: reference, 1: reference, 2: reference}


def test_prefill_is_chunked_within_the_budget(engine):
    """Chunks of at most `prefill_chunk` per request while rows decode, the whole budget for a lone prompt."""
    calls = []
    scheduler = EngineCore(engine, config(prefill_chunk=5, prefill_budget=10))
    execute = scheduler.runner.execute

    def watch(plan):
        if plan.prefill:
            calls.append(([len(c.tokens) for c in plan.prefill], bool(plan.decode)))
        return execute(plan)

    scheduler.runner.execute = watch
    sinks = run_staggered(scheduler, [([1] * 23, GREEDY), ([2] * 12, GREEDY), ([3] * 9, GREEDY)], 3)
    assert calls[:3] == [([10], False), ([10], False), ([3], False)]  # alone: the budget per step
    assert all(sum(c) <= 10 and (not during or max(c) <= 5) for c, during in calls)
    assert any(during for _, during in calls)
    assert [s.tokens[0] for s in sinks] == [engine.generate([p], GREEDY)[0][0].token_ids
                                            for p in ([1] * 23, [2] * 12, [3] * 9)]


def test_cancel_frees_the_slots_at_the_next_step(engine):
    scheduler = EngineCore(engine, config(slots=2))
    first, second = Collector(), Collector()
    request = scheduler.submit(prompts(1)[0], GREEDY.replace(max_new_tokens=100, n=2), first)
    scheduler.step()
    assert scheduler.stats()["free_slots"] == 0
    scheduler.submit(prompts(1, seed=3)[0], GREEDY, second)
    request.cancel()
    scheduler.step()
    assert first.finished and first.error is None
    stats = scheduler.stats()
    assert (stats["running"], stats["waiting"], stats["free_slots"]) == (1, 0, 1)
    assert stats["free_blocks"] == scheduler.blocks.capacity - scheduler.blocks.needed(-1, len(prompts(1, seed=3)[0]))


def test_queue_bound_and_prompt_limits(engine):
    scheduler = EngineCore(engine, config(slots=1, max_waiting=2, max_length=32))
    for _ in range(2):
        scheduler.submit([1, 2], GREEDY, Collector())
    with pytest.raises(QueueFull, match="overloaded"):
        scheduler.submit([1, 2], GREEDY, Collector())
    with pytest.raises(PromptTooLong):
        scheduler.submit([1] * 32, GREEDY, Collector())
    with pytest.raises(ValueError, match="token id"):
        scheduler.submit([1, 97], GREEDY, Collector())
    with pytest.raises(ValueError, match="slots"):
        scheduler.submit([1], GREEDY.replace(n=2), Collector())


def test_max_length_caps_generation(engine):
    [sink] = run_staggered(EngineCore(engine, config(max_length=12)), [([5] * 9, GREEDY)], 1)
    assert len(sink.tokens[0]) == 3 and sink.reasons[0] == "length"


def test_reset_rows_zeroes_mamba_state_and_lengths(engine):
    scheduler = EngineCore(engine, config())
    run_staggered(scheduler, [(p, GREEDY) for p in prompts(2)], 1)
    cache = scheduler.runner.cache
    assert any(float(s.ssm[:2].abs().sum()) > 0 for s in cache.mamba)
    scheduler.runner.reset_rows([0, 1])
    assert all(float(s.ssm[:2].abs().sum()) == 0 and float(s.conv[:2].abs().sum()) == 0 for s in cache.mamba)
    assert cache.seqlens[:2].tolist() == [0, 0]


def test_memory_budget_and_blocks_follow_the_tokens_held(engine):
    scheduler = EngineCore(engine, config(max_length=64))
    budget = scheduler.memory
    assert (budget.block_size, budget.kv_blocks) == (16, 4 * 4)  # default: every slot can reach max_length
    assert budget.total_bytes == scheduler.runner.cache.nbytes
    sink = Collector()
    scheduler.submit([3] * 20, GREEDY.replace(max_new_tokens=20), sink)
    scheduler.step()  # prefill (20 tokens: 2 blocks) and the first token
    assert scheduler.stats()["free_blocks"] == 16 - 2
    while not sink.finished:
        scheduler.step()
    scheduler.step()  # the freed row's table reaches the device with the next plan
    assert scheduler.stats()["free_blocks"] == 16 and scheduler.runner.cache.full[0].block_table.sum() == 0
    assert len(sink.tokens[0]) == 20  # 20 + 20 tokens crossed into a third block
    assert kv_blocks_for_budget(engine.model, 4, 64, 16, scheduler.memory.total_bytes) == 16
    with pytest.raises(ValueError, match="constant state"):
        kv_blocks_for_budget(engine.model, 4, 64, 16, 4 * budget.bytes_per_slot)


def test_preemption_recomputes_and_keeps_outputs(engine):
    """A pool of 6 blocks (96 tokens) for 4 slots: requests grow past it, the newest are preempted and
    recomputed, and every output equals the request run alone."""
    requests = [(p, GREEDY.replace(max_new_tokens=30)) for p in prompts(4, seed=9)]
    scheduler = EngineCore(engine, config(max_length=64, kv_blocks=6))
    sinks = run_staggered(scheduler, requests, 1)
    assert scheduler.scheduler.preemptions > 0
    for sink, (prompt, params) in zip(sinks, requests, strict=True):
        assert sink.tokens[0] == engine.generate([prompt], params)[0][0].token_ids
    assert scheduler.stats()["free_blocks"] == 6


def test_preemption_keeps_sampled_n_requests_and_penalties(engine):
    params = SamplingParams(temperature=0.8, seed=3, max_new_tokens=24, n=2, frequency_penalty=0.7)
    requests = [(p, params) for p in prompts(3, seed=4)]
    alone = [run_staggered(EngineCore(engine, config(max_length=64)), [r], 1)[0].tokens for r in requests]
    scheduler = EngineCore(engine, config(max_length=64, kv_blocks=8))
    together = [s.tokens for s in run_staggered(scheduler, requests, 2)]
    assert scheduler.scheduler.preemptions > 0 and together == alone


def test_pool_limits_are_clear_errors(engine):
    with pytest.raises(ValueError, match="less than one sequence"):
        EngineCore(engine, config(max_length=64, kv_blocks=3))
    scheduler = EngineCore(engine, config(max_length=64, kv_blocks=5))
    with pytest.raises(ValueError, match="K/V blocks"):
        scheduler.submit([1] * 10, GREEDY.replace(max_new_tokens=50, n=2), Collector())
    with pytest.raises(ValueError, match="power of two"):
        config(block_size=24)


def test_thread_close_finishes_then_refuses(engine):
    scheduler = EngineCore(engine, config()).start()
    outputs = queue.Queue()
    scheduler.submit(prompts(1)[0], GREEDY, outputs.put)
    scheduler.close(grace=30)
    seen = []
    while not outputs.empty():
        seen.append(outputs.get())
    assert seen[-1].finished and seen[-1].error is None and sum(len(o.deltas) for o in seen) == 10
    with pytest.raises(SchedulerClosed):
        scheduler.submit([1], GREEDY, outputs.put)


def test_close_after_grace_aborts_with_an_error(engine):
    scheduler = EngineCore(engine, config()).start()
    sink = Collector()
    scheduler.submit(prompts(1)[0], GREEDY.replace(max_new_tokens=400), sink)
    scheduler.close(grace=0.05)
    assert sink.finished and "shut down" in sink.error
    assert scheduler.stats()["running"] == 0


@pytest.mark.parametrize("kv_blocks", [None, 8])
def test_asynchronous_scheduling_equals_synchronous(engine, kv_blocks):
    """Step n+1 planned before step n's tokens are seen: the same tokens and finish reasons,
    through early stops (the extra decoded token is dropped), fan-out, penalties and preemption."""
    ps = prompts(5, seed=11)
    stop = engine.generate([ps[0]], GREEDY)[0][0].token_ids[4]
    requests = [(ps[0], GREEDY.replace(max_new_tokens=30, stop_token_ids=(stop,))),
                (ps[1], SamplingParams(temperature=0.8, seed=5, n=2, max_new_tokens=20, frequency_penalty=0.6)),
                (ps[2], GREEDY.replace(max_new_tokens=25, logprobs=2)),
                (ps[3], GREEDY.replace(max_new_tokens=1)),
                (ps[4], SamplingParams(temperature=1.0, top_k=5, seed=9, max_new_tokens=28))]
    runs = {}
    for overlap in (False, True):
        core = EngineCore(engine, config(max_length=64, kv_blocks=kv_blocks))
        sinks = run_staggered(core, requests, 2, overlap=overlap)
        runs[overlap] = [(s.tokens, s.reasons) for s in sinks]
        assert core.stats()["free_slots"] == 4 and core.stats()["running"] == 0
    assert runs[True] == runs[False]
    assert runs[False][0][1] == {0: "stop"} and len(runs[False][0][0][0]) < 30


def test_warm_up_leaves_no_trace(engine):
    """Warm-up prefills on the spare row through `execute`; afterwards every row, length and block is free
    and requests give the tokens they give without it."""
    core = EngineCore(engine, config(max_length=64, warm_up=True))
    cache = core.runner.cache
    assert cache.seqlens.tolist() == [0] * 5 and int(cache.full[0].block_table.abs().sum()) == 0
    assert core.stats()["free_blocks"] == core.blocks.capacity
    ps = prompts(3, seed=2)
    assert [s.tokens[0] for s in run_staggered(core, [(p, GREEDY) for p in ps], 1, overlap=True)] == [
        engine.generate([p], GREEDY)[0][0].token_ids for p in ps]
