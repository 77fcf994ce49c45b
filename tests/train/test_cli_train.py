"""`sambay train` as a user meets it (issue 12): help with defaults, progress output, CPU dtype, memory fit."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from sambay.cli import train as train_cli
from sambay.train import memory
from sambay.train.config import TrainConfig, field_docs, load_train_config
from sambay.train.loop import train
from sambay.train.metrics import read_log
from sambay.train.progress import Reporter, duration, step_line
from sambay.train.setup import Runtime, build_model, resolve_dtype
from tests.train.conftest import tiny_run

GIB = 2**30


def _help_entries() -> dict[str, str]:
    """Flag -> its help text, read back from the formatted ``--help`` (wrapping undone)."""
    parser = argparse.ArgumentParser(prog="sambay train")
    train_cli.add_arguments(parser)
    out = {}
    for block in parser.format_help().split("\n\n"):  # usage, description, then one block per group
        options = "\n".join(line for line in block.splitlines() if line.startswith(" "))  # minus the title
        for entry in re.split(r"^  (?=-)", options, flags=re.M):
            if entry.startswith("--"):
                out[entry.split()[0].rstrip(",")] = " ".join(entry.split())
    return out


def test_help_gives_every_field_flag_a_text_and_its_default():
    entries = _help_entries()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in entries, flag
        words = entries[flag].split()
        assert len(words) > 4, f"{flag} has no help text: {entries[flag]!r}"
        assert re.search(r"\(default: [^)]+\)$", entries[flag]), f"{flag}: {entries[flag]!r}"
    assert "(default: 512)" in entries["--seq-len"]
    assert "(default: auto)" in entries["--dtype"]
    assert "(default: on)" in entries["--resume"]


def test_every_config_field_is_documented_in_a_section():
    docs = field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    for name, (section, text) in docs.items():
        assert section and text, name
    assert docs["micro_batch_size"][0].startswith("batch")


def test_dtype_defaults_to_float32_on_cpu_and_bfloat16_on_cuda():
    said = []
    report = Reporter()
    report.say = said.append
    assert TrainConfig().dtype == "auto"
    assert resolve_dtype(TrainConfig(), torch.device("cpu"), report).dtype == "float32"
    assert resolve_dtype(TrainConfig(), torch.device("cuda", 0), report).dtype == "bfloat16"
    assert said == []
    assert resolve_dtype(TrainConfig(dtype="bfloat16"), torch.device("cpu"), report).dtype == "bfloat16"
    assert len(said) == 1 and "--dtype float32" in said[0]


def test_piped_cli_prints_preparation_and_progress_lines(corpus, tmp_path):
    fields = tiny_run(corpus, tmp_path / "run", max_steps=4, log_every=2, dtype="auto").to_dict()
    fields = {k: v for k, v in fields.items() if v is not None}
    (tmp_path / "run.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_INTERACTIVE")}  # rich: a pipe
    result = subprocess.run([sys.executable, "-m", "sambay.cli", "train", str(tmp_path / "run.toml")],
                            capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert re.search(r"^data: \d[\d,]* training windows of 32 tokens", err, re.M), err
    assert re.search(r"^training sambay-da-tiny .* on cpu, float32: 4 steps", err, re.M), err
    steps = re.findall(r"^step (\d+)/4 \| loss \d+\.\d+ \| lr \S+ \| [\d,]+ tokens/s \| elapsed \d:\d\d:\d\d \| "
                       r"eta \d:\d\d:\d\d$", err, re.M)
    assert steps == ["1", "2", "4"], err  # the first step, then every log_every
    assert "\x1b[" not in err  # no terminal control codes in a pipe
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 4  # stdout: the result only


def test_terminal_gets_a_live_bar():
    out = io.StringIO()
    report = Reporter(Console(file=out, force_terminal=True, width=150, highlight=False))
    report.start(0, 10)
    for step in range(1, 4):
        report.step(step, 10, 1234.0, *((2.5, 1e-3) if step == 1 else ()))
    report.stop()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # the bar's colours and cursor moves
    assert "step 1/10 | loss 2.5000" in text  # the logged step's line, above the bar
    assert re.search(r"3/10 .*loss 2\.5000 \| 1,234 tokens/s \| 0:00:0\d elapsed \| eta 0:00:0\d", text), text


def test_step_line_and_duration():
    assert duration(3725.4) == "1:02:05"
    assert step_line(50, 1500, 2.34567, 2e-3, 12345.6, 62, 1790) == (
        "step 50/1500 | loss 2.3457 | lr 2.00e-03 | 12,346 tokens/s | elapsed 0:01:02 | eta 0:29:50")


def test_fit_micro_batch_splits_into_the_fewest_micro_steps_that_fit():
    config = TrainConfig(micro_batch_size=64, grad_accum=2, eval_batches=4)
    need = memory.StepMemory(per_sequence=GIB, fixed=GIB)
    assert memory.fit_micro_batch(config, need, 100 * GIB) is config
    fitted = memory.fit_micro_batch(config, need, 20 * GIB)  # 85%: 17 GB, so 16 sequences + 1 GB fixed
    assert (fitted.micro_batch_size, fitted.grad_accum, fitted.eval_batches) == (16, 8, 16)
    odd = memory.fit_micro_batch(dataclasses.replace(config, micro_batch_size=7), need, 4 * GIB)
    assert (odd.micro_batch_size, odd.grad_accum) == (1, 14)  # only divisors keep the global batch
    with pytest.raises(ValueError, match="--seq-len"):
        memory.fit_micro_batch(config, need, GIB)


def test_saved_bytes_grow_with_the_sequence(corpus, tmp_path):
    config = tiny_run(corpus, tmp_path)
    model = build_model(config, Runtime(0, 1, torch.device("cpu")))
    short, long = (memory.saved_bytes(model, t, torch.device("cpu"), torch.autocast("cpu", enabled=False))
                   for t in (32, 64))
    assert short > 0 and 1.8 * short < long < 4 * short
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no trace


def test_memory_fit_splits_the_micro_batch_and_keeps_the_updates(corpus, tmp_path, monkeypatch):
    common = dict(max_steps=2, micro_batch_size=8, eval_batches=1)
    train(tiny_run(corpus, tmp_path / "whole", **common))
    config = tiny_run(corpus, tmp_path / "split", **common)
    model = build_model(config, Runtime(0, 1, torch.device("cpu")))
    need = memory.step_memory(model, config, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    monkeypatch.setattr(memory, "available_bytes", lambda: int(need.step_bytes(2) / memory.USABLE_FRACTION) + 1)
    said = []
    report = Reporter()
    report.say = said.append
    train(config, report)
    assert any("running 4 micro-batches of 2 per step" in s and "--micro-batch-size" in s for s in said), said
    whole, split = read_log(tmp_path / "whole" / "log.jsonl"), read_log(tmp_path / "split" / "log.jsonl")
    for step in (1, 2):
        assert split[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5), step
    final_whole = read_log(tmp_path / "whole" / "log.jsonl", "final")[2]
    final_split = read_log(tmp_path / "split" / "log.jsonl", "final")[2]
    assert final_split["loss"] == pytest.approx(final_whole["loss"], rel=1e-5)  # the same held-out windows


def test_arithmetic_recipes_fit_in_memory_on_a_cpu():
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    gpu, cpu = (load_train_config(scripts / name) for name in ("arithmetic.toml", "arithmetic-cpu.toml"))
    assert (cpu.model, cpu.seq_len, cpu.dtype) == (gpu.model, gpu.seq_len, "auto")
    model = build_model(gpu, Runtime(0, 1, torch.device("cpu")))
    need = memory.step_memory(model, gpu, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert memory.fit_micro_batch(cpu, need, 8 * GIB) is cpu  # the CPU recipe fits an 8 GB machine as it is
    fitted = memory.fit_micro_batch(gpu, need, 16 * GIB)  # the GPU recipe is split, the global batch kept
    assert fitted.micro_batch_size < gpu.micro_batch_size
    assert fitted.micro_batch_size * fitted.grad_accum == gpu.micro_batch_size * gpu.grad_accum == 64
