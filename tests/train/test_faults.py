"""Training faults of issue 13: `kill -9` at the exact moment that used to lose a run or its data.

Each fault runs the trainer (or the data preparation) in a child process that sends itself SIGKILL
right after the n-th call of a named function returns: the same `kill -9` as the resume test in
`test_checkpoint.py`, but at a chosen instant instead of whenever a polling parent gets there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sambay import SambaY
from sambay.config import PRESETS
from sambay.tokenizer import load_tokenizer
from sambay.train import state
from sambay.train.arithmetic import make_split
from sambay.train.config import load_train_config
from sambay.train.data import prepare_data
from sambay.train.metrics import read_log
from sambay.train.optim import build_optimizer
from tests.train.conftest import tiny_run

# the child: wraps `module.name` so that the process kills itself (SIGKILL) once call `after` has returned
_CHILD = """
import importlib, json, os, signal, sys
job = json.loads(sys.argv[1])
if job["kill"]:
    module = importlib.import_module(job["kill"]["module"])
    real, calls = getattr(module, job["kill"]["name"]), []
    def dying(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == job["kill"]["after"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(module, job["kill"]["name"], dying)
exec(job["code"], {"args": job["args"]})
"""
_TRAIN = ("from sambay.train.config import load_train_config; from sambay.train.loop import train; "
          "train(load_train_config(None, args))")
_PREPARE = ("from sambay.tokenizer import load_tokenizer; from sambay.train.data import prepare_data; "
            "prepare_data(args['files'], load_tokenizer(args['tokenizer']), args['data_dir'])")


def _launch(code: str, args: dict, kill: dict | None = None) -> subprocess.Popen:
    """Runs ``code`` (with ``args`` in scope) in a child; ``kill``: {"module", "name", "after"} as above."""
    job = json.dumps({"code": code, "args": args, "kill": kill})
    return subprocess.Popen([sys.executable, "-c", _CHILD, job], env={**os.environ, "OMP_NUM_THREADS": "1"})


def _run(code: str, args: dict, kill: dict | None = None) -> int:
    return _launch(code, args, kill).wait(timeout=120)


def _fields(corpus: Path, out_dir: Path, data_dir: Path, **overrides) -> dict:
    return {**tiny_run(corpus, out_dir, data_dir=str(data_dir)).to_dict(), **overrides}


def test_no_resume_over_later_checkpoints_then_kill_9_resumes_this_run(corpus, tmp_path):
    """A fresh run in a directory holding an earlier run's later steps, killed after its first checkpoint.

    It used to prune the checkpoint it had just written (the earlier run's steps sort after it),
    leave `latest` naming a missing directory, and the next run restarted at step 1 without a word.
    """
    data = tmp_path / "data"
    assert _run(_TRAIN, _fields(corpus, tmp_path / "reference", data, max_steps=8)) == 0  # also prepares `data`
    assert _run(_TRAIN, _fields(corpus, tmp_path / "run", data, max_steps=12, checkpoint_every=4, seed=1)) == 0
    fresh = _fields(corpus, tmp_path / "run", data, max_steps=10_000, checkpoint_every=4, resume=False)
    kill_after_first_save = {"module": "sambay.train.loop", "name": "save_checkpoint", "after": 1}
    assert _run(_TRAIN, fresh, kill_after_first_save) == -signal.SIGKILL
    log = tmp_path / "run" / "log.jsonl"
    fresh_steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"]
    assert fresh_steps and max(fresh_steps) <= 4  # the earlier run's log went aside with its checkpoints
    earlier = read_log(tmp_path / "run" / "checkpoints.old-1" / "log.jsonl")
    assert max(earlier) == 12
    lines_before = len(log.read_text().splitlines())
    assert _run(_TRAIN, _fields(corpus, tmp_path / "run", data, max_steps=8, checkpoint_every=4)) == 0
    resumed = [json.loads(line) for line in log.read_text().splitlines()[lines_before:]]
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [5, 6, 7, 8], "did not resume at step 4"
    expected = read_log(tmp_path / "reference" / "log.jsonl")
    for record in (r for r in resumed if r["kind"] == "train"):
        assert record["loss"] == pytest.approx(expected[record["step"]]["loss"], rel=1e-6, abs=1e-6)
    aside = tmp_path / "run" / "checkpoints.old-1"
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_00000008", "step_00000012"]


def _trained_pair():
    model = SambaY(PRESETS["sambay-da-tiny"], backend="reference").init_weights(torch.Generator().manual_seed(0))
    return model, build_optimizer(model, load_train_config(None, {}))


@pytest.mark.parametrize("damage", ["missing", "incomplete", "no_pointer", "outside"])
def test_bad_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage):
    model, optimizer = _trained_pair()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        state.save_checkpoint(root, step, model, optimizer, {}, keep=0)
    if damage == "missing":
        (root / "latest").write_text("step_00000009")
    elif damage == "incomplete":
        (root / "step_00000003" / "model.safetensors").unlink()
    elif damage == "no_pointer":
        (root / "latest").unlink()
    else:  # a complete checkpoint, but another run's
        state.save_checkpoint(tmp_path / "other", 5, model, optimizer, {})
        (root / "latest").write_text("../other/step_00000005")
    said = []
    found = state.latest_checkpoint(root, say=said.append)
    assert found == root / ("step_00000002" if damage == "incomplete" else "step_00000003")
    assert len(said) == 1 and found.name in said[0], said


def test_prune_keeps_the_checkpoint_just_written_and_leaves_later_steps(tmp_path):
    model, optimizer = _trained_pair()
    for step in (8, 12, 4):  # an earlier run's steps 8 and 12, then this run's step 4
        state.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert state.latest_checkpoint(tmp_path) == tmp_path / "step_00000004"
    state.save_checkpoint(tmp_path, 5, model, optimizer, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000005", "step_00000008",
                                                          "step_00000012"]


def _shards(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.glob("*/shard_*"))}


def test_kill_9_while_replacing_shards_redoes_the_preparation(corpus, tmp_path):
    """Re-preparing a shared data_dir for other inputs, killed after the first new shard is in place.

    The old fingerprint used to stay beside the new shard, so the next run for the old inputs reused
    the directory and trained on the other data.
    """
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(e) + "\n" for e in make_split(300, seed=7)))
    tokenizer, ours = load_tokenizer(corpus / "tokenizer"), [str(corpus / "train.jsonl")]
    clean = _shards(prepare_data(ours, tokenizer, tmp_path / "clean"))
    shared = tmp_path / "shared"
    prepare_data(ours, tokenizer, shared)
    job = {"files": [str(other)], "tokenizer": str(corpus / "tokenizer"), "data_dir": str(shared)}
    kill_after_first_shard = {"module": "sambay.train.data", "name": "_atomic_tofile", "after": 1}
    assert _run(_PREPARE, job, kill_after_first_shard) == -signal.SIGKILL
    assert _shards(shared) != clean  # the kill landed half-way: one shard is the other data's
    prepare_data(ours, tokenizer, shared)
    assert _shards(shared) == clean
    assert json.loads((shared / "meta.json").read_text()) == json.loads((tmp_path / "clean" / "meta.json").read_text())
