"""Training checkpoints: atomic under an injected crash, and continuous across `kill -9` + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sambay import SambaY
from sambay.config import PRESETS
from sambay.train import state
from sambay.train.config import load_train_config
from sambay.train.metrics import read_log
from sambay.train.optim import build_optimizer
from tests.train.conftest import tiny_run


def _trained_pair(seed: int):
    model = SambaY(PRESETS["sambay-da-tiny"], backend="reference").init_weights(torch.Generator().manual_seed(seed))
    optimizer = build_optimizer(model, load_train_config(None, {}))
    model(torch.randint(0, 512, (2, 10))).float().square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_crash_mid_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _trained_pair(0)
    good = state.save_checkpoint(tmp_path, 1, model, optimizer, {"samples_seen": 4})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = state.save_file

    def crash_on_optimizer(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):
            real_save(tensors, path)  # a complete file, then the crash
            raise OSError("disk on fire")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(state, "save_file", crash_on_optimizer)
    with pytest.raises(OSError, match="disk on fire"):
        state.save_checkpoint(tmp_path, 2, model, optimizer, {"samples_seen": 8})
    assert state.latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "step_00000002").exists() and (tmp_path / ".tmp-step_00000002").exists()
    fresh, fresh_optimizer = _trained_pair(1)
    record = state.load_checkpoint(good, fresh, fresh_optimizer)
    assert record["step"] == 1 and record["samples_seen"] == 4
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    monkeypatch.setattr(state, "save_file", real_save)
    state.save_checkpoint(tmp_path, 3, model, optimizer, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003"]


def _launch(config_fields: dict) -> subprocess.Popen:
    code = ("import json, sys; from sambay.train.config import load_train_config; from sambay.train.loop import train;"
            "train(load_train_config(None, json.loads(sys.argv[1])))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(config_fields)], env=env)


def _fields(corpus, out_dir, **overrides) -> dict:
    return {**tiny_run(corpus, out_dir).to_dict(), **overrides}


def test_kill_9_then_resume_continues_the_same_loss_curve(corpus, tmp_path):
    reference = _launch(_fields(corpus, tmp_path / "reference", max_steps=14))
    killed = _launch(_fields(corpus, tmp_path / "run", max_steps=10_000, checkpoint_every=4))
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not (latest.exists() and latest.read_text() == "step_00000008"):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = _launch(_fields(corpus, tmp_path / "run", max_steps=14, checkpoint_every=4))
    assert resumed.wait(timeout=60) == 0 and reference.wait(timeout=60) == 0
    expected, got = read_log(tmp_path / "reference" / "log.jsonl"), read_log(tmp_path / "run" / "log.jsonl")
    assert len(expected) == 14 and set(got) >= set(range(9, 15))
    for step in range(1, 15):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-6, abs=1e-6), step
