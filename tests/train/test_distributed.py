"""DDP and FSDP2 on 2 CPU processes (gloo, loopback) reproduce one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from sambay.train.config import load_train_config
from sambay.train.loop import train
from sambay.train.metrics import read_log
from tests.train.conftest import tiny_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fields: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        train(load_train_config(None, fields))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(parallel, corpus, tmp_path):
    common = dict(max_steps=6, grad_accum=2, eval_batches=2, checkpoint_every=3)
    train(tiny_run(corpus, tmp_path / "single", micro_batch_size=4, **common))
    fields = tiny_run(corpus, tmp_path / "multi", micro_batch_size=2, parallel=parallel, **common).to_dict()
    mp.start_processes(_worker, args=(2, _free_port(), fields), nprocs=2, join=True, start_method="spawn")
    single, multi = read_log(tmp_path / "single" / "log.jsonl"), read_log(tmp_path / "multi" / "log.jsonl")
    assert sorted(multi) == sorted(single) == list(range(1, 7))
    for step in single:
        assert multi[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4), step
        assert multi[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-3), step
    final_single = read_log(tmp_path / "single" / "log.jsonl", "final")[6]
    final_multi = read_log(tmp_path / "multi" / "log.jsonl", "final")[6]
    assert final_multi["loss"] == pytest.approx(final_single["loss"], rel=1e-4)
    assert (tmp_path / "multi" / "checkpoints" / "step_00000006" / "model.safetensors").exists()
    assert (tmp_path / "multi" / "model" / "config.json").exists()
