"""Serving several LoRA adapters at once (`sambay serve --lora NAME=DIR`, issue 18).

A mixed batch of two adapters (of different ranks and targets) and the base model gives every request
the tokens it gets alone from the model with its adapter merged into the weights; the prefix cache never
serves one adapter's state to another; `/v1/models` lists the adapters and ``model`` selects one (an
unknown name is OpenAI's 404); bad ``--lora`` flags are one-line usage errors.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pytest
import torch

from sambay.cli import __main__ as cli
from sambay.generate import Engine, SamplingParams
from sambay.generate.core import EngineCore
from sambay.generate.plan import PrefillChunk, StepPlan, decode, encode
from sambay.generate.requests import SchedulerConfig
from sambay.lora import (
    apply_lora,
    attach_adapters,
    lora_delta,
    lora_delta_gathered,
    lora_layers,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from sambay.serve.app import create_app
from sambay.serve.server import ServeConfig, build_runtime
from tests.conftest import random_model, small_config
from tests.serve.conftest import MODEL, LiveServer, free_port

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
# adapter 1: every projection, rank 4; adapter 2: attention and MLP only, rank 2 (padded to 4 in shared layers)
ADAPTERS = ((("all",), 4, 1), (("attention", "mlp"), 2, 2))


def make_adapter(directory: Path, model, targets, rank: int, seed: int):
    """A PEFT adapter for ``model``'s shapes with random A and B (B = 0 would change nothing)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    apply_lora(model, targets, rank=rank, alpha=2.0 * rank, generator=g)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3, generator=g)
    return read_adapter(save_adapter(model, directory))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the base model, its two adapters)."""
    torch.set_num_threads(1)
    base = random_model(small_config())
    root = tmp_path_factory.mktemp("adapters")
    adapters = [make_adapter(root / f"a{seed}", base, targets, rank, seed) for targets, rank, seed in ADAPTERS]
    return base, adapters


def served_engine(base, adapters) -> Engine:
    model = copy.deepcopy(base)
    attach_adapters(model, adapters)
    return Engine(model)


def alone(base, adapter, prompt) -> list[int]:
    """Greedy tokens of ``prompt`` from the base model with ``adapter`` (None: none) merged into its weights."""
    model = copy.deepcopy(base) if adapter is None else merge_adapter(copy.deepcopy(base), adapter)
    return Engine(model).generate([prompt], GREEDY)[0][0].token_ids


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(length),), generator=g).tolist()
            for length in torch.randint(3, 40, (n,), generator=g)]


def run(core: EngineCore, requests: list[tuple[list[int], int]], every: int = 1, overlap: bool = False):
    """Submit (prompt, adapter) requests one every ``every`` steps; step until all finish; tokens of each."""
    tokens: list[list[int]] = []
    done: list[bool] = []
    pending, step = list(requests), 0

    def sink(i):
        def put(output):
            tokens[i].extend(d.token_id for d in output.deltas)
            done[i] = done[i] or output.finished
        return put

    while pending or not all(done):
        if pending and step % every == 0:
            tokens.append([])
            done.append(False)
            prompt, adapter = pending.pop(0)
            core.submit(prompt, GREEDY, sink(len(tokens) - 1), adapter)
        core.step(overlap)
        step += 1
        assert step < 2000
    return tokens


def test_gathered_delta_is_each_rows_own_adapter():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 4, generator=g)
    scaling, x = torch.tensor([0.0, 0.5, 2.0]), torch.randn(4, 5, 8, generator=g)
    index = torch.tensor([2, 0, 1, 2])
    got = lora_delta_gathered(x, A, B, scaling, index)
    for row, slot in enumerate(index.tolist()):
        torch.testing.assert_close(got[row], lora_delta(x[row], A[slot], B[slot], scaling[slot]))
    decode_x = x[:, 0]  # (b, in): a decode step's Mamba projections see no time axis
    torch.testing.assert_close(lora_delta_gathered(decode_x, A, B, scaling, index), got[:, 0])


def test_plan_round_trip_keeps_the_rows_adapters():
    plan = StepPlan(reset=(3, 1), adapters=(2, 0), prefill=(PrefillChunk(3, (5, 6), True),), decode=(0,))
    assert decode(encode(plan)) == plan


@pytest.mark.parametrize(("every", "overlap"), [(1, False), (3, True)])
def test_a_mixed_batch_gives_each_request_its_output_alone(models, every, overlap):
    base, adapters = models
    ps = prompts(6)
    requests = [(p, i % 3) for i, p in enumerate(ps)]  # base, adapter 1, adapter 2, ...
    expected = [alone(base, None if a == 0 else adapters[a - 1], p) for p, a in requests]
    assert expected[1] != alone(base, None, ps[1]) and expected[2] != alone(base, None, ps[2])  # adapters matter
    config = SchedulerConfig(slots=4, prefill_chunk=7, prefill_budget=14, block_size=16)
    core = EngineCore(served_engine(base, adapters), config)
    assert core.limits.adapters == 2
    assert run(core, requests, every, overlap) == expected


def test_the_prefix_cache_does_not_mix_adapters(models):
    base, adapters = models
    prompt = prompts(1, seed=7)[0] + prompts(1, seed=8)[0] + prompts(1, seed=9)[0]  # > 2 blocks of 16
    assert len(prompt) > 40
    config = SchedulerConfig(slots=4, prefill_chunk=16, prefill_budget=32, block_size=16, prefix_cache_bytes=10**7)
    core = EngineCore(served_engine(base, adapters), config)
    cached = (len(prompt) - 1) // 16 * 16  # the last block boundary before the final token
    for adapter, hits in ((0, 0), (1, 0), (2, 0), (1, cached), (0, cached)):  # a hit only after the same adapter
        before = core.stats()["prefix_cache_hits"]
        [tokens] = run(core, [(prompt, adapter)])
        assert tokens == alone(base, None if adapter == 0 else adapters[adapter - 1], prompt)
        assert core.stats()["prefix_cache_hits"] - before == hits, adapter


def test_an_unknown_adapter_slot_is_refused(models):
    base, adapters = models
    core = EngineCore(served_engine(base, adapters[:1]), SchedulerConfig(slots=2, block_size=16))
    with pytest.raises(ValueError, match="adapter slot 2 does not exist"):
        core.submit([1, 2, 3], GREEDY, lambda output: None, 2)


# the HTTP API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(model_dir, tmp_path_factory):
    """A live server over the session's tiny model (a fresh copy) with adapters ``math`` and ``code``."""
    engine = Engine.load(model_dir, progress=False)
    root = tmp_path_factory.mktemp("served")
    adapters = [make_adapter(root / name, engine.model, targets, rank, seed)
                for name, (targets, rank, seed) in zip(("math", "code"), ADAPTERS, strict=True)]
    attach_adapters(engine.model, adapters)
    scheduler = SchedulerConfig(slots=4, prefill_chunk=16, prefill_budget=32, block_size=16)
    runtime = build_runtime(engine, ServeConfig(model_dir=model_dir, scheduler=scheduler, adapters=("math", "code")))
    with LiveServer(create_app(runtime), free_port()) as live:
        yield live
    runtime.scheduler.close(0)


def test_models_lists_the_adapters(lora_server):
    data = httpx.get(f"{lora_server.url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [(MODEL, None), ("math", MODEL), ("code", MODEL)]


def test_model_selects_the_adapter(lora_server):
    def complete(model):
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        response = httpx.post(f"{lora_server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    texts = {}
    for model in (MODEL, "math", "code", "math"):
        answer = complete(model)
        assert answer["model"] == model
        texts.setdefault(model, answer["choices"][0]["text"])
        assert texts[model] == answer["choices"][0]["text"]
    assert len(set(texts.values())) == 3  # each adapter changes the greedy output


def test_an_unknown_model_is_a_404(lora_server):
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(f"{lora_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'math'" in error["message"]


# the CLI -----------------------------------------------------------------------------------------



def test_cli_serves_the_adapters(model_dir, tmp_path, served):
    engine = Engine.load(model_dir, progress=False)
    make_adapter(tmp_path / "a", engine.model, ("attention",), 2, 1)
    command = ["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", "--no-engine-process",
               "--lora", f"tuned={tmp_path / 'a'}"]
    assert cli.main(command) == 0
    [runtime] = served
    assert runtime.adapters == ("tuned",) and runtime.scheduler.limits.adapters == 1


@pytest.mark.parametrize(("flag", "message"), [
    ("noequals", "expected NAME=DIR"),
    ("=dir", "expected NAME=DIR"),
    ("name=", "expected NAME=DIR"),
    ("name=/does/not/exist", "adapter directory /does/not/exist does not exist"),
])
def test_bad_lora_flags_are_one_line_usage_errors(model_dir, capsys, served, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", "--lora", flag])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], err
    assert not served


@pytest.mark.parametrize(("extra", "message"), [
    (["--lora", "x={dir}"], "name is already taken"),
    (["--served-model-name", "x"], "name is already taken (by the base model)"),
    (["--tensor-parallel", "2"], "--lora does not combine with --tensor-parallel"),
])
def test_lora_names_and_tensor_parallel_are_checked_before_loading(model_dir, tmp_path, capsys, served, monkeypatch,
                                                                    extra, message):
    from sambay.cli import serve

    monkeypatch.setattr(serve, "load_engine", lambda *a, **k: pytest.fail("the model loaded"))
    engine = Engine.load(model_dir, progress=False)
    make_adapter(tmp_path / "a", engine.model, ("mlp",), 2, 1)
    command = ["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", "--no-engine-process",
               "--lora", f"x={tmp_path / 'a'}", *(e.format(dir=tmp_path / "a") for e in extra)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err.splitlines()[-1], err


@pytest.mark.slow
def test_the_engine_process_serves_the_adapters(model_dir, tmp_path):
    """`RemoteScheduler` loads the adapters in its process; a request's adapter slot crosses the pipe."""
    import queue

    from sambay.serve.engine_process import EngineSpec, RemoteScheduler

    engine = Engine.load(model_dir, progress=False)
    adapter = make_adapter(tmp_path / "a", engine.model, ("all",), 4, 1)
    spec = EngineSpec(model_dir=str(model_dir), tokenizer_dir=str(model_dir), device="cpu", dtype=None,
                      scheduler=SchedulerConfig(slots=2, max_length=128, block_size=16),
                      adapters=(str(tmp_path / "a"),))
    remote = RemoteScheduler(spec)
    try:
        assert remote.limits.adapters == 1
        prompt, outputs = [5, 6, 7, 8], queue.Queue()
        remote.submit(prompt, GREEDY, outputs.put, 1)
        tokens, last = [], None
        while last is None or not last.finished:
            last = outputs.get(timeout=60)
            tokens += [d.token_id for d in last.deltas]
        merged = Engine(merge_adapter(engine.model, adapter), engine.tokenizer, stop_token_ids=engine.stop_token_ids)
        assert tokens == merged.generate([prompt], GREEDY)[0][0].token_ids
    finally:
        remote.close(0)
