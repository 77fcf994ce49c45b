"""`benchmarks/tensor_parallel.py` under torchrun with 2 CPU ranks (gloo): it runs and reports, so the
multi-GPU measurement is one command when a machine with several GPUs is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.test_tensor_parallel import _free_port

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tensor_parallel.py"


@pytest.mark.slow
def test_tensor_parallel_benchmark_runs_on_two_cpu_ranks(tmp_path):
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port())]
    command = [str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--preset", "tiny", "--heads", "8", "4",
               "--batches", "1", "3", "--context", "16", "--prefill", "32", "--steps", "2"]
    result = subprocess.run([sys.executable, *launch, *command], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "tp2.json").read_text())
    assert report["tensor_parallel"] == 2 and [d["batch"] for d in report["decode"]] == [1, 3]
    assert all(d["tokens_per_s"] > 0 for d in report["decode"]) and report["prefill"]["tokens_per_s"] > 0
