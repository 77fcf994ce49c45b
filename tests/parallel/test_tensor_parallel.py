"""Tensor parallelism: a SambaY-DA sharded over 2 CPU processes (gloo) gives the single-process logits.

Two processes are spawned once (torch.multiprocessing, a free port on 127.0.0.1). Each builds the same
random model, keeps an unsharded copy as the reference, shards the other with `tensor_parallel`, and
compares: a full forward; a ragged two-chunk cached prefill and decode steps crossing the sliding
window; Engine generation (greedy and seeded sampling) through the sharded model's own `new_cache`.
The worker raises on the first mismatch and `spawn` re-raises it here with its traceback.
The CLI test runs `generate --tensor-parallel 2` under torchrun on a saved tiny model.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sambay
from sambay.config import LayerKind, sambay_plan
from sambay.default_model import default_model_dir
from sambay.generate import Engine, SamplingParams
from sambay.parallel import TensorParallel, check_tensor_parallel, tensor_parallel
from tests.conftest import forward, random_model, small_config
from tests.tolerances import FP32_MODEL, assert_close

WORLD = 2
# 2 kv-head pairs, so each of the 2 ranks gets one pair and its 2 query pairs; d_inner 64, d_ff 48.
CONFIG = small_config(n_heads=8, n_kv_heads=4)
# Attention makes d_model (so d_inner) split with the heads: only a model without attention fails on d_inner.
MAMBA_ONLY = dict(n_heads=1, n_kv_heads=1, d_model=33, expand=1, differential=False, plan=(LayerKind.MAMBA,) * 4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with torch.inference_mode():
            _check_cannot_split()
            reference = random_model(CONFIG, seed=1)
            sharded = tensor_parallel(copy.deepcopy(reference))
            _check_shapes(sharded)
            _check_full_forward(reference, sharded)
            _check_cached(reference, sharded)
        _check_engine(reference, sharded)
    finally:
        dist.destroy_process_group()


def _check_cannot_split() -> None:
    model = random_model(small_config(n_heads=4, n_kv_heads=2))  # one kv pair cannot go to two ranks
    with pytest.raises(ValueError, match="1 differential kv-head pairs"):
        tensor_parallel(model)
    assert not isinstance(model, TensorParallel)


def _check_shapes(sharded) -> None:
    cache = sharded.new_cache(batch_size=2, max_length=16)
    assert cache.mamba[0].ssm.shape == (2, CONFIG.d_inner // WORLD, CONFIG.d_state)
    assert cache.full[0].k.shape == (2, CONFIG.n_kv_heads // WORLD, 16, CONFIG.head_dim)
    assert sharded.tensor_parallel_size == WORLD
    with pytest.raises(ValueError, match="already tensor-parallel"):
        tensor_parallel(sharded)


def _check_full_forward(reference, sharded) -> None:
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    assert_close(sharded(tokens), reference(tokens), **FP32_MODEL, what="full forward")


def _check_cached(reference, sharded) -> None:
    """Ragged prefill in two chunks, then decode steps well past the window of 5."""
    g = torch.Generator().manual_seed(3)
    caches = [m.new_cache(batch_size=3, max_length=40) for m in (reference, sharded)]
    for chunk, lengths in ((7, [7, 3, 5]), (4, [2, 4, 1])):
        tokens = torch.randint(0, CONFIG.vocab_size, (3, chunk), generator=g)
        lengths = torch.tensor(lengths)
        pairs = zip((reference, sharded), caches, strict=True)
        expected, actual = (forward(m, tokens, c, lengths=lengths) for m, c in pairs)
        assert_close(actual, expected, **FP32_MODEL, what=f"ragged prefill chunk of {chunk}")
    for step in range(8):
        token = torch.randint(0, CONFIG.vocab_size, (3, 1), generator=g)
        expected, actual = (forward(m, token, c) for m, c in zip((reference, sharded), caches, strict=True))
        assert_close(actual, expected, **FP32_MODEL, what=f"decode step {step}")
    assert torch.equal(caches[0].seqlens, caches[1].seqlens)


def _check_engine(reference, sharded) -> None:
    """Greedy and seeded sampling: the same tokens as one process, on every rank."""
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4]]
    for params in (SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=()),
                   SamplingParams(temperature=1.0, seed=7, n=2, max_new_tokens=10, stop_token_ids=())):
        expected = [[c.token_ids for c in row] for row in Engine(reference).generate(prompts, params)]
        actual = [[c.token_ids for c in row] for row in Engine(sharded).generate(prompts, params)]
        assert actual == expected, f"rank {dist.get_rank()}: {actual} != {expected}"
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, actual)
        assert everyone[0] == everyone[1]


@pytest.mark.slow
def test_two_ranks_match_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


@pytest.mark.parametrize(
    ("fields", "n", "message"),
    [
        (dict(n_heads=4, n_kv_heads=2), 2, "1 differential kv-head pairs"),
        (dict(n_heads=8, n_kv_heads=4), 3, "2 differential kv-head pairs"),
        (dict(n_heads=8, n_kv_heads=4, differential=False), 3, r"n_kv_heads \(4\) is not divisible by 3"),
        (dict(n_heads=8, n_kv_heads=4, d_ff=50), 4, r"d_ff \(50\) is not divisible by 4"),
        (MAMBA_ONLY, 2, r"d_inner \(33\) is not divisible by 2"),
    ],
)
def test_cannot_split_error(fields, n, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(small_config(**fields), n)


def test_divisible_configs_pass():
    check_tensor_parallel(CONFIG, 2)
    check_tensor_parallel(small_config(n_heads=8, n_kv_heads=8, plan=sambay_plan(4), differential=False), 8)
    with pytest.raises(ValueError, match="positive int"):
        check_tensor_parallel(CONFIG, 0)


def test_needs_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        tensor_parallel(random_model(CONFIG))


@pytest.mark.slow
def test_cli_generate_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m sambay.cli generate --tensor-parallel 2`: one process's greedy text."""
    sambay.save_model(random_model(small_config(vocab_size=512, n_heads=8, n_kv_heads=4)), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(default_model_dir() / name, tmp_path / name)  # the demo model's 512-id tokenizer
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port())]
    command = ["-m", "sambay.cli", "generate", "--tensor-parallel", "2", "--model", str(tmp_path), "--device", "cpu",
               "--raw", "--json", "--temperature", "0", "--max-new-tokens", "8", "12+7="]
    result = subprocess.run([sys.executable, *launch, *command], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()  # rank 0 prints, the other rank only steps
    [[expected]] = Engine.load(tmp_path, progress=False).generate(["12+7="], SamplingParams(temperature=0,
                                                                                             max_new_tokens=8))
    [choice] = json.loads(line)["choices"]
    assert (choice["content"], choice["completion_tokens"]) == (expected.text, len(expected.token_ids))
