"""Tensor-parallel serving: rank 0's scheduler broadcasts every forward and cache operation, rank 1 follows.

A spawned 2-process gloo run: rank 0 schedules staggered requests (greedy, seeded n = 2 samples with a
penalty, and a pool small enough to force preemption) over a sharded model with a `BroadcastRunner`;
rank 1 runs `follow`. The outputs must equal a single-process scheduler's over the unsharded model.
The CLI test serves `--tensor-parallel 2` under torchrun and answers an HTTP completion, then shuts
down on SIGTERM with both ranks exiting.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sambay
from sambay.default_model import default_model_dir
from sambay.generate import Engine, SamplingParams
from sambay.generate.core import EngineCore, make_runner
from sambay.generate.requests import SchedulerConfig
from sambay.parallel import tensor_parallel
from sambay.parallel.serving import BroadcastRunner, follow
from tests.conftest import random_model, small_config
from tests.parallel.test_tensor_parallel import CONFIG, WORLD, _free_port

SCHEDULER = SchedulerConfig(slots=4, max_length=64, block_size=16, kv_blocks=6, prefill_chunk=7, prefill_budget=14,
                            prefix_cache_bytes=10**7)
REQUESTS = [
    ([5, 9, 2, 7, 1, 3, 8, 8, 2], SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=())),
    ([4, 4], SamplingParams(temperature=0.9, seed=3, n=2, max_new_tokens=20, frequency_penalty=0.5,
                            stop_token_ids=())),
    (list(range(1, 30)), SamplingParams(temperature=0, max_new_tokens=25, stop_token_ids=())),
]
LATER = [([*range(1, 21), 9, 9], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=()))]  # cached prefix


def _collect(scheduler: EngineCore, overlap: bool = False, requests=REQUESTS) -> list[dict[int, list[int]]]:
    """Submit ``requests`` one step apart; step (asynchronously with ``overlap``) until all finish; each request's
    tokens per sample."""
    results = [{} for _ in requests]
    done = [False] * len(requests)

    def sink(i):
        def put(output):
            for d in output.deltas:
                results[i].setdefault(d.sample_index, []).append(d.token_id)
            done[i] = done[i] or output.finished
        return put

    for i, (prompt, params) in enumerate(requests):
        scheduler.submit(prompt, params, sink(i))
        scheduler.step(overlap)
    for _ in range(500):
        if all(done):
            return results
        scheduler.step(overlap)
    raise AssertionError("requests did not finish")


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        reference = random_model(CONFIG, seed=2)
        sharded = tensor_parallel(copy.deepcopy(reference))
        if rank > 0:
            follow(make_runner(sharded, SCHEDULER))
            return
        runner = make_runner(sharded, SCHEDULER, BroadcastRunner)
        try:
            scheduler = EngineCore(Engine(sharded), SCHEDULER, runner)
            actual = _collect(scheduler, overlap=True)  # asynchronous here, synchronous alone
            actual += _collect(scheduler, True, LATER)  # from the prefix cache
        finally:
            runner.stop()
        single = EngineCore(Engine(reference), dataclasses.replace(SCHEDULER, prefix_cache_bytes=0))
        expected = _collect(single) + _collect(single, False, LATER)
        assert single.scheduler.preemptions > 0 and scheduler.scheduler.preemptions > 0
        assert scheduler.stats()["prefix_cache_hits"] == 16, scheduler.stats()  # LATER, from the third request
        assert actual == expected, f"{actual} != {expected}"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_scheduler_matches_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


@pytest.mark.slow
def test_cli_serve_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m sambay.cli serve --tensor-parallel 2`: one process's greedy completion."""
    sambay.save_model(random_model(small_config(vocab_size=512, n_heads=8, n_kv_heads=4)), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default_model_dir() / name, tmp_path / name)
    port = _free_port()
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port())]
    command = ["-m", "sambay.cli", "serve", "--tensor-parallel", "2", "--model", str(tmp_path), "--device", "cpu",
               "--port", str(port), "--slots", "2", "--shutdown-grace", "5"]
    process = subprocess.Popen([sys.executable, *launch, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": tmp_path.name, "prompt": "12+7=", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        [[expected]] = Engine.load(tmp_path, progress=False).generate(
            ["12+7="], SamplingParams(temperature=0, max_new_tokens=8))
        assert reply["choices"][0]["text"] == expected.text
        assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    finally:
        process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks, then exits with status 1
        output = process.communicate(timeout=60)[0].decode()
    assert "Finished server process" in output, output  # rank 0 drained and stopped the follower
    assert "rank 1: stopped by rank 0" in output, output  # the follower ignored the signal and was released
