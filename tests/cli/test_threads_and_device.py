"""CPU threads (issue 12: an unset thread count made a busy 2-core machine decode the embedded model 50-100x
slower) and devices this torch cannot use (a one-line error, not torch's traceback)."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch
from torch import nn

from sambay.cli import __main__ as cli
from sambay.cli import chat, generate
from sambay.cli._common import SMALL_MODEL_PARAMS, default_threads, physical_cores, set_threads
from tests.cli.conftest import assert_one_line_error, run


def test_small_models_get_one_thread_large_ones_one_per_physical_core():
    assert default_threads(3_700_000, cores=8) == 1  # the embedded arithmetic model
    assert default_threads(SMALL_MODEL_PARAMS - 1, cores=8) == 1
    assert default_threads(3_850_000_000, cores=8) == 8  # Phi-4-mini-flash
    assert default_threads(3_850_000_000, cores=1) == 1


def test_physical_cores_are_within_the_affinity():
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= physical_cores() <= allowed


@pytest.fixture
def thread_calls(monkeypatch) -> list[int]:
    """`torch.set_num_threads` recorded instead of applied; OMP_NUM_THREADS unset."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return calls


def test_set_threads_explicit_auto_and_omp_num_threads(monkeypatch, thread_calls):
    small = nn.Linear(4, 4)
    assert set_threads(3, small) == 3  # --threads wins
    assert set_threads(None, small) == 1  # a small CPU model: one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_threads(None, small) == torch.get_num_threads()  # the user's OMP_NUM_THREADS is kept
    assert set_threads(5, small) == 5
    assert thread_calls == [3, 1, 5]


def test_a_large_cpu_model_gets_one_thread_per_physical_core(monkeypatch, thread_calls):
    monkeypatch.setattr("sambay.cli._common.physical_cores", lambda: 6)
    monkeypatch.setattr("sambay.cli._common.SMALL_MODEL_PARAMS", 10)  # nn.Linear(4, 4) has 20 parameters
    assert set_threads(None, nn.Linear(4, 4)) == 6 and thread_calls == [6]


@pytest.mark.parametrize("threads", [None, "3"])
def test_generate_and_chat_set_threads_once(monkeypatch, capsys, engine, thread_calls, threads):
    flag = ["--threads", threads] if threads else []
    monkeypatch.setattr(generate, "load_engine", lambda options, console: engine)
    monkeypatch.setattr(chat, "load_engine", lambda options, console: engine)
    assert cli.main(["generate", "--model", "unused", "--max-new-tokens", "2", *flag, "hi"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main(["chat", "--model", "unused", "--max-new-tokens", "2", *flag]) == 0
    expected = int(threads) if threads else 1  # the tiny test model is far below SMALL_MODEL_PARAMS
    assert thread_calls == [expected, expected]


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--threads", "0", "hi"], "argument --threads: must be an integer >= 1, got '0'"),
    (["chat", "--threads", "two"], "argument --threads: must be an integer >= 1, got 'two'"),
    (["generate", "--device", "gpu", "hi"], "--device gpu: "),
    (["generate", "--device", "cuda", "hi"], "--device cuda: "),
    (["chat", "--device", "cuda:1"], "--device cuda:1: "),
])
def test_bad_threads_and_unusable_devices_are_one_line_usage_errors(monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU-only torch says
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert err.startswith(f"sambay {args[0]}: error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_cuda_on_a_cpu_only_torch_exits_2_without_a_traceback():
    result = run("generate", "--device", "cuda", "hi")
    assert_one_line_error(result, 2, "--device cuda: ")
    assert "use --device cpu" in result.stderr
