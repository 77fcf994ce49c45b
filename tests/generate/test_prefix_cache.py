"""Prefix caching on a tiny random model: cached and uncached runs agree, and nothing leaks.

Prompts share a 45-token "system prompt" (blocks of 16: two full blocks and a partial one) and end
mid-block, on a block boundary, diverge inside a block, or repeat exactly; the cache is checked against
each request run alone without it (greedy tokens, seeded samples, logprobs), under snapshot and block
eviction, preemption, asynchronous scheduling, and n samples.
"""

from __future__ import annotations

import pytest
import torch

from sambay.cache import allocate_cache
from sambay.generate import Engine, SamplingParams
from sambay.generate.blocks import BlockPool
from sambay.generate.core import EngineCore
from sambay.generate.plan import PrefillChunk, StepPlan, decode, encode
from sambay.generate.prefix_cache import PrefixCache, chain_keys
from sambay.generate.requests import SchedulerConfig
from tests.conftest import random_model, small_config
from tests.serve.test_scheduler import run_staggered

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def engine():
    return Engine(random_model(small_config()))


def config(**overrides) -> SchedulerConfig:
    return SchedulerConfig(**{"slots": 4, "prefill_chunk": 16, "prefill_budget": 32, "block_size": 16,
                              "prefix_cache_bytes": 10**7, **overrides})


def shared_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 97, (45,), generator=g).tolist()
    rest = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 19, 1, 35)]
    diverging = system[:40] + [(t + 1) % 97 for t in system[40:]] + rest[0]  # differs inside block 2
    aligned = system + rest[1][:3]  # 48 tokens: ends on a block boundary
    return [system + rest[0], system + rest[1], diverging, system + rest[2], aligned, system + rest[0],
            system + rest[3], system[:7]]


def alone(engine, prompts, params=GREEDY):
    return [engine.generate([p], params)[0][0].token_ids for p in prompts]


def assert_no_leaks(core: EngineCore):
    """Every row let go of its blocks; kept blocks are idle (free to take back), none referenced."""
    blocks = core.blocks
    assert blocks._refs == {} and not any(blocks._owned.values())
    assert blocks.free_blocks == blocks.capacity


@pytest.mark.parametrize("overlap", [False, True])
def test_cached_greedy_outputs_equal_each_prompt_alone(engine, overlap):
    prompts = shared_prompts()
    core = EngineCore(engine, config())
    got = run_staggered(core, [(p, GREEDY) for p in prompts], 6, overlap)
    assert [s.tokens[0] for s in got] == alone(engine, prompts)
    stats = core.stats()
    assert stats["prefix_cache_queries"] == sum(map(len, prompts))
    assert stats["prefix_cache_hits"] >= 5 * 32 and stats["prefix_cache_snapshots"] > 0
    assert_no_leaks(core)


def test_cached_logprobs_equal_uncached(engine):
    params = GREEDY.replace(logprobs=0)
    prompts = shared_prompts()[:3]

    def logprobs(core):
        out = []
        for p in prompts:
            seen = []
            core.submit(p, params, lambda output, seen=seen: seen.extend(d.logprob.logprob for d in output.deltas))
            while core.busy:
                core.step()
            out.append(seen)
        return out

    cached_core = EngineCore(engine, config())
    cached, uncached = logprobs(cached_core), logprobs(EngineCore(engine, config(prefix_cache_bytes=0)))
    assert cached_core.stats()["prefix_cache_hits"] == 64  # prompts 2 and 3 restore at 32 tokens
    for a, b in zip(cached, uncached, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)


def test_seeded_samples_and_n_share_the_prompt(engine):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, n=3, max_new_tokens=8, frequency_penalty=0.4)
    prompts = shared_prompts()[:2] * 2
    uncached = [s.tokens for s in run_staggered(EngineCore(engine, config(prefix_cache_bytes=0)),
                                                [(p, params) for p in prompts], 3)]
    core = EngineCore(engine, config(slots=6))
    assert [s.tokens for s in run_staggered(core, [(p, params) for p in prompts], 3)] == uncached
    assert core.stats()["prefix_cache_hits"] >= 3 * 32
    assert_no_leaks(core)


def test_siblings_share_the_full_prompt_blocks(engine):
    core = EngineCore(engine, config())
    core.submit(shared_prompts()[0], GREEDY.replace(n=3), lambda output: None)
    step = core.scheduler.schedule()
    slots = [row.slot for row in step.admitted[0].rows]
    owned = [core.blocks.owned(slot) for slot in slots]
    assert owned[1][:3] == owned[2][:3] == owned[0][:3]  # 50 tokens: three full blocks shared
    assert len({o[3] for o in owned}) == 3  # the partial block is each sample's own


def test_eviction_under_pressure_keeps_outputs(engine):
    """Two snapshot entries and a pool of 10 blocks for 4 slots: snapshots and kept blocks are evicted and
    rows preempted, and every output still equals the prompt run alone."""
    per_slot = EngineCore(engine, config()).memory.bytes_per_slot
    prompts = shared_prompts()
    params = GREEDY.replace(max_new_tokens=30)
    core = EngineCore(engine, config(max_length=128, kv_blocks=10, prefix_cache_bytes=2 * per_slot))
    got = run_staggered(core, [(p, params) for p in prompts], 1)
    assert [s.tokens[0] for s in got] == alone(engine, prompts, params)
    assert core.scheduler.preemptions > 0 and core.stats()["prefix_cache_snapshots"] <= 2
    assert_no_leaks(core)


def test_a_cached_prefix_is_found_again_after_its_request_ends(engine):
    core = EngineCore(engine, config())
    first, second = shared_prompts()[:2]
    run_staggered(core, [(first, GREEDY)], 1)
    hits = core.stats()["prefix_cache_hits"]
    assert run_staggered(core, [(second, GREEDY)], 1)[0].tokens[0] == alone(engine, [second])[0]
    assert core.stats()["prefix_cache_hits"] - hits == 32


def pool(blocks=8, entries=2, block_size=16) -> PrefixCache:
    cache = allocate_cache(n_mamba=1, n_sliding=1, n_full=1, batch_size=4, max_length=64, d_inner=4, d_state=2,
                           d_conv=4, n_kv_heads=1, head_dim=4, window=8, dtype=torch.float32, device="meta",
                           block_size=block_size, kv_blocks=blocks)
    return PrefixCache(BlockPool(cache), entries)


def test_lookup_verifies_tokens_so_a_hash_collision_is_never_served():
    cache = pool()
    tokens = list(range(40))
    keys = chain_keys(tokens, 16, 2)
    assert cache.blocks.grow(0, 40)
    assert cache.snapshot(tokens, keys, 32, cache.blocks.owned(0)) == 0
    hit = cache.lookup(tokens, keys)
    assert hit is not None and hit.length == 32 and hit.blocks == tuple(cache.blocks.owned(0)[:2])
    other = [t + 100 for t in tokens]
    assert cache.lookup(other, keys) is None  # the same keys over other tokens: refused
    assert cache.lookup(tokens[:32], keys) is None  # a prompt must keep a token to prefill


def test_snapshots_are_evicted_least_recently_used_and_kept_blocks_first_released_first():
    cache = pool(blocks=4, entries=2)
    a, b, c = ([i] * 16 for i in (1, 2, 3))
    for slot, tokens in enumerate((a, b)):
        assert cache.blocks.grow(slot, 17)
        cache.snapshot([*tokens, 0], chain_keys(tokens, 16, 1), 16, cache.blocks.owned(slot))
    assert cache.lookup([*a, 0], chain_keys(a, 16, 1)) is not None  # a is now the most recently used
    assert cache.blocks.free_blocks == 0  # slots 0 and 1 hold the pool's 4 blocks
    cache.blocks.release(0)
    cache.blocks.release(1)
    assert cache.blocks.free_blocks == 4
    assert cache.blocks.grow(2, 17)  # takes the two blocks no one kept (the second block of each row)
    cache.snapshot([*c, 0], chain_keys(c, 16, 1), 16, cache.blocks.owned(2))
    assert cache.lookup([*b, 0], chain_keys(b, 16, 1)) is None  # b's snapshot was the least recently used
    assert cache.lookup([*a, 0], chain_keys(a, 16, 1)) is not None
    assert cache.blocks.grow(3, 17)  # no free block is left: kept blocks are taken back, oldest first
    assert cache.lookup([*a, 0], chain_keys(a, 16, 1)) is None  # a's block was released first


def test_plans_with_restores_and_saves_survive_the_broadcast_encoding():
    plan = StepPlan(reset=(1,), restore=((4, 1, 32), (0, 2, 16)),
                    prefill=(PrefillChunk(1, (5, 6), False, 3), PrefillChunk(1, (7,), True)), decode=(0,))
    back = decode(encode(plan))
    assert back.restore == plan.restore and back.prefill == plan.prefill and back.decode == plan.decode
