"""`benchmarks/copy_phase.py`: its sequences really hold one span twice with a varying gap (so only a lookup by
content lowers the second copy's loss), and the script trains both architectures and writes its curve."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "copy_phase.py"


def _script():
    spec = importlib.util.spec_from_file_location("copy_phase", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_batch_is_a_span_a_gap_and_the_span_again():
    cp = _script()
    gen = torch.Generator().manual_seed(0)
    leads = set()
    for _ in range(12):
        x = cp.batch(gen, 3, 5, 7)
        assert x.shape == (3, 17) and int(x.min()) >= 1 and int(x.max()) < cp.VOCAB
        lead = next(a for a in range(8) if torch.equal(x[:, a : a + 5], x[:, -5:]))
        leads.add(lead)
    assert len(leads) > 1  # the gap varies, so no fixed offset reaches the first copy


def test_the_script_trains_both_and_writes_the_curve(tmp_path, monkeypatch):
    out = tmp_path / "copy.json"
    monkeypatch.setattr(sys, "argv", ["copy_phase.py", "--steps", "4", "--every", "2", "--eval-batches", "1",
                                      "--rows", "2", "--layers", "8", "--d-model", "32", "--heads", "4",
                                      "--n", "6", "--max-gap", "4", "--window", "4", "--out", str(out)])
    assert _script().main() == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"sambay-da", "transformer"}
    for run in runs.values():
        assert [step for step, _ in run["curve"]] == [0, 2, 4] and run["params"] > 0
        assert all(0 < loss < 10 for _, loss in run["curve"])
