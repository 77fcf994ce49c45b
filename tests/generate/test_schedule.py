"""The scheduling policy alone: `Scheduler.schedule()` plans read on a fake runner (no model, no device work).

Tokens are fed back with `update()` as a runner and sampler would; the plans' fields are checked directly:
admission (fresh rows, block tables), chunked prefill within the budget, n-sample fan-out, decode rows,
block growth and preemption with recompute, cancellation.
"""

from __future__ import annotations

import itertools

import torch

from sambay.cache import allocate_cache
from sambay.generate.blocks import BlockPool
from sambay.generate.outputs import OutputProcessor
from sambay.generate.plan import StepPlan, decode, encode
from sambay.generate.requests import Request, SchedulerConfig
from sambay.generate.sampling import SamplingParams
from sambay.generate.scheduler import Scheduler, Step

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())


class _Ids:
    """What `Request` needs of its owner: ids, and cancel (unused here)."""

    def __init__(self):
        self._ids = itertools.count()

    def cancel(self, request):
        pass


def make(slots=3, kv_blocks=None, block_size=16, max_length=64, snapshots=0, **config) -> Scheduler:
    cache = allocate_cache(n_mamba=1, n_sliding=1, n_full=1, batch_size=slots + 1, max_length=max_length, d_inner=4,
                           d_state=2, d_conv=4, n_kv_heads=1, head_dim=4, window=8, dtype=torch.float32,
                           device="meta", block_size=block_size, kv_blocks=kv_blocks)
    c = SchedulerConfig(slots=slots, max_length=max_length, block_size=block_size, kv_blocks=kv_blocks, **config)
    return Scheduler(c, BlockPool(cache), OutputProcessor(None, ()), max_length, lambda seed: None, snapshots)


def add(s: Scheduler, owner: _Ids, prompt: list[int], params=GREEDY) -> Request:
    request = Request(owner, prompt, params, lambda output: None)
    s.waiting.append(request)
    return request


def feed(s: Scheduler, step: Step, token: int = 7):
    """The runner's and sampler's part: one token per sample; returns the outputs."""
    return s.update(step, [token] * len(step.samples), None)


def test_admission_resets_rows_gives_blocks_and_prefills_whole_prompts_when_nothing_decodes():
    s, owner = make(prefill_chunk=5, prefill_budget=40), _Ids()
    add(s, owner, list(range(1, 21)))
    add(s, owner, [9] * 17)
    step = s.schedule()
    plan = step.plan
    assert plan.reset == (0, 1) and plan.block_rows == (0, 1)
    assert plan.block_table[:, :2].tolist() == [[1, 2], [3, 4]]  # 20 and 17 tokens: two blocks each
    assert [(c.slot, len(c.tokens), c.emit) for c in plan.prefill] == [(0, 20, True), (1, 17, True)]
    assert plan.prefill[0].tokens == tuple(range(1, 21)) and plan.decode == () and plan.emit == (0, 1)
    assert [(x.row.slot, x.index) for x in step.samples] == [(0, 0), (1, 1)]
    feed(s, step)
    nxt = s.schedule().plan
    assert nxt.decode == (0, 1) and nxt.prefill == () and nxt.reset == ()


def test_prefill_chunks_shrink_while_rows_decode_and_stay_in_the_budget():
    s, owner = make(prefill_chunk=5, prefill_budget=8), _Ids()
    add(s, owner, [1] * 3)
    feed(s, s.schedule())  # the first request now decodes
    add(s, owner, [2] * 12)
    add(s, owner, [3] * 9)
    seen = []
    while s.waiting or any(run.prefilling or run.fresh for run in s.running):
        step = s.schedule()
        seen.append([len(c.tokens) for c in step.plan.prefill])
        feed(s, step)
    # a chunk that does not fit the rest of the budget waits whole: chunk boundaries depend on the request alone
    assert seen[:3] == [[5], [5], [2, 5]] and all(sum(c) <= 8 and max(c, default=0) <= 5 for c in seen)


def test_n_samples_prefill_once_and_fan_out():
    s, owner = make(), _Ids()
    add(s, owner, [4] * 10, GREEDY.replace(n=3))
    step = s.schedule()
    assert [c.slot for c in step.plan.prefill] == [0] and step.plan.copies == ((0, 1), (0, 2))
    assert [(x.row.slot, x.index) for x in step.samples] == [(0, 0), (1, 0), (2, 0)]
    assert s.blocks.free_blocks == s.blocks.capacity - 3  # each sample owns its prompt's block
    feed(s, step)
    assert s.schedule().plan.decode == (0, 1, 2)


def test_decode_takes_a_block_at_each_boundary_and_finishes_at_the_limit():
    s, owner = make(slots=1), _Ids()
    add(s, owner, [1] * 16, GREEDY.replace(max_new_tokens=4))
    plans = []
    outputs = []
    while s.busy:
        step = s.schedule()
        plans.append(step.plan)
        outputs += feed(s, step)
    assert [p.decode for p in plans] == [(), (0,), (0,), (0,)]  # 4 tokens: 1 from the prefill, 3 decoded
    assert plans[1].block_rows == (0,) and plans[1].block_table[0, :2].tolist() == [1, 2]  # position 16
    assert outputs[-1][1].finished and s.blocks.free_blocks == s.blocks.capacity and s.free == [0]


def test_preemption_frees_the_newest_and_resumes_it_with_its_history():
    s, owner = make(slots=2, kv_blocks=4, max_length=64), _Ids()
    old = add(s, owner, [1] * 30, GREEDY.replace(max_new_tokens=30))
    new = add(s, owner, [2] * 30, GREEDY.replace(max_new_tokens=30))
    generated = {old.id: 0, new.id: 0}
    preempted_plan = None
    for _ in range(200):
        if not s.busy:
            break
        step = s.schedule()
        if s.preemptions and preempted_plan is None:
            preempted_plan = step.plan
            assert 1 not in step.plan.decode and [r.request for r in s.preempted] == [new]
        for request, output in feed(s, step):
            generated[request.id] += len(output.deltas)
        if preempted_plan is not None and s.running and any(r.request is new for r in s.running):
            resumed = next(r for r in s.running if r.request is new)
            if resumed.jobs:  # re-prefilling: its prompt and every token it had generated
                assert resumed.jobs[0].tokens == [2] * 30 + resumed.rows[0].generated
    assert s.preemptions >= 1 and generated == {old.id: 30, new.id: 30}
    assert s.blocks.free_blocks == 4 and sorted(s.free) == [0, 1]


def test_cancel_frees_rows_and_drops_late_results():
    s, owner = make(), _Ids()
    first = add(s, owner, [1] * 5, GREEDY.replace(n=2))
    add(s, owner, [2] * 5)
    step = s.schedule()
    assert s.cancel({first.id}) == [first]
    assert s.free == [0, 1] and [run.request.id for run in s.running] == [1]
    delivered = feed(s, step)  # the step planned before the cancel: its first request is dropped
    assert [request.id for request, _ in delivered] == [1]
    nxt = s.schedule().plan
    assert nxt.decode == (2,)


def test_plans_survive_the_broadcast_encoding():
    plan = StepPlan(reset=(3,), block_rows=(3, 5), block_table=torch.tensor([[1, 2, 0], [4, 0, 0]], dtype=torch.int32),
                    copies=((3, 5),), decode=(1, 2, 7))
    s, owner = make(), _Ids()
    add(s, owner, [1] * 9, GREEDY.replace(n=2))
    for p in (plan, s.schedule().plan, StepPlan()):
        back = decode(encode(p))
        assert back.reset == p.reset and back.block_rows == p.block_rows and back.prefill == p.prefill
        assert back.copies == p.copies and back.decode == p.decode
        assert (back.block_table is None) == (p.block_table is None)
        if p.block_table is not None:
            assert torch.equal(back.block_table, p.block_table)


def test_a_preempted_request_resumes_from_its_cached_prompt():
    """Prefix cache (issue 15): the newest request is preempted; when it returns, its row restores the
    snapshot of its prompt's last boundary (32 of its 40 tokens) and re-prefills only the rest."""
    s, owner = make(slots=2, kv_blocks=5, snapshots=4, prefill_chunk=64, prefill_budget=64), _Ids()
    add(s, owner, [3] * 20, GREEDY.replace(max_new_tokens=14))  # 2 blocks, then a third at length 32
    add(s, owner, list(range(1, 41)), GREEDY.replace(max_new_tokens=30))  # 3 blocks: the pool is full
    restored = None
    for _ in range(100):
        step = s.schedule()
        if step.plan.restore:  # only a resume can hit: the two prompts share nothing
            restored = step.plan
        feed(s, step)
        if not s.busy:
            break
    assert s.preemptions == 1 and restored is not None
    (_, slot, length), = restored.restore
    assert length == 32 and restored.prefill[0].slot == slot and restored.prefill[0].tokens[:8] == tuple(range(33, 41))
    assert s.prefix.hits >= 32 and not s.busy
