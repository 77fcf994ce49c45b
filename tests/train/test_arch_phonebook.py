"""`benchmarks/arch_phonebook.py`: its document-aligned training data keeps every phonebook whole in one
training window, and the whole script runs end to end on a CPU (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sambay.default_model import default_model_dir
from sambay.tokenizer import load_tokenizer
from sambay.train.data import PackedData, prepare_data

pytest.importorskip("faker")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "arch_phonebook.py"
SEQ = 384


def _script():
    spec = importlib.util.spec_from_file_location("arch_phonebook", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup():
    from sambay.eval.retrieval import training_documents

    ap = _script()
    tokenizer = load_tokenizer(default_model_dir())
    docs = training_documents("phonebook", tokenizer, ap.phonebook_lengths(SEQ), 12, seed=3)
    _, files = ap.stdlib_files(0)
    text, _ = ap.text_stream(files, 40_000)
    return ap, tokenizer, docs, tokenizer.encode(text)


def test_phonebook_lengths_fit_one_sequence():
    ap = _script()
    assert ap.phonebook_lengths(2048) == [256, 512, 768, 1024, 1280, 1536, 1792, 1984]
    assert ap.parse_lengths("1K,2K,4096,16K") == [1024, 2048, 4096, 16384]


def test_compose_gives_sequences_of_exactly_the_training_length(setup):
    ap, tokenizer, docs, text_ids = setup
    sequences, stats = ap.compose(tokenizer, text_ids, docs, SEQ, 16, 0.75, seed=0)
    assert stats["sequences"] == len(sequences) == 16 and stats["skipped"] == 0
    assert 0 < stats["phonebook_sequences"] < 16
    assert all(len(tokenizer.encode(s)) == SEQ - 1 for s in sequences)  # + <|endoftext|> = SEQ
    assert sum(any(d in s for d in docs) for s in sequences) == stats["phonebook_sequences"]


def test_every_training_window_holds_its_phonebook_whole(setup, tmp_path):
    """The trainer's windows (prepare_data + PackedData) are the composed documents, each with its phonebook
    (book, examples, question and answer) uncut; documents of random lengths packed back to back are cut."""
    ap, tokenizer, docs, text_ids = setup
    sequences, _ = ap.compose(tokenizer, text_ids, docs, SEQ, 12, 1.0, seed=1)
    for name, texts in (("aligned", sequences), ("packed", docs)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare_data([str(tmp_path / "aligned.jsonl")], tokenizer, tmp_path / "aligned", heldout_fraction=0.0)
    assert ap.shards_aligned(tmp_path / "aligned", SEQ)
    data = PackedData(tmp_path / "aligned", "train", SEQ, shuffle=False)
    assert data.n_windows == len(sequences) - 1  # the last document lacks the one token after it
    for i in range(data.n_windows):
        window = tokenizer.decode(data.batch(i, 1).inputs[0].tolist())
        assert window.startswith(sequences[i]) and any(d in window for d in docs)
    prepare_data([str(tmp_path / "packed.jsonl")], tokenizer, tmp_path / "packed", heldout_fraction=0.0)
    packed = PackedData(tmp_path / "packed", "train", SEQ, shuffle=False)
    windows = [tokenizer.decode(packed.batch(i, 1).inputs[0].tolist()) for i in range(packed.n_windows)]
    assert sum(any(d in w for d in docs) for w in windows) < packed.n_windows
    assert not ap.shards_aligned(tmp_path / "packed", SEQ)


def test_markdown_table_marks_lengths_beyond_training():
    ap = _script()
    result = {"eval": {"lengths": [1024, 2048, 4096]}, "train": {"seq_len": 2048},
              "models": {a: {"params": 31_700_000} for a in ap.ARCHS},
              "accuracy": {a: {"1024": {"accuracy": 1.0}, "2048": {"accuracy": 0.5}} for a in ap.ARCHS}}
    table = ap.markdown_table(result)
    assert "| 1K | 2K | 4K* |" in table and "| SambaY-DA | 31.7M | 100% | 50% | - |" in table


def test_combine_merges_one_arch_runs_and_refuses_different_ones():
    ap = _script()

    def one(arch, steps=100):
        return {"command": f"arch_phonebook.py --archs {arch}", "data": {"sequences": 10, "seconds": 3.0},
                "train": {"steps": steps, "batch": 8, "seq_len": 2048, "lr": 1e-3, "timing": {"train_wall_s": 1.0},
                          "runs": {arch: {"steps": steps}}},
                "eval": {"lengths": [1024], "samples": 2}, "models": {arch: {"params": 1}},
                "accuracy": {arch: {"1024": {"accuracy": 0.5}}}, "total_s": 2.0}

    merged = ap.combine([one("sambay-da"), one("transformer")])
    assert set(merged["accuracy"]) == set(merged["models"]) == set(merged["train"]["runs"]) == set(ap.ARCHS)
    assert set(merged["train"]["timing"]) == set(ap.ARCHS) and merged["total_s"] == 4.0
    with pytest.raises(ValueError, match="differ in steps"):
        ap.combine([one("sambay-da"), one("transformer", steps=99)])
    with pytest.raises(ValueError, match="more than one"):
        ap.combine([one("sambay-da"), one("sambay-da")])


def test_leading_digits_counts_the_right_prefix(tmp_path):
    ap = _script()
    rows = [{"header": {}},
            {"length": 1024, "answer": "9145237358", "output": " 9145237358"},  # 10
            {"length": 1024, "answer": "9145237358", "output": " 91452"},  # stopped early: 5
            {"length": 4096, "answer": "7164132091", "output": " 716413209"},  # 9
            {"length": 4096, "answer": "7164132091", "output": " 8111111111"},  # 0
            {"length": 4096, "answer": "7164132091", "output": None}]  # nothing generated: 0
    path = tmp_path / "x.eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ap.leading_digits(path) == {"1024": 7.5, "4096": 3.0}


@pytest.mark.slow
def test_script_runs_end_to_end_on_cpu(tmp_path):
    """One architecture per call, the second reusing the first's data, then --combine (the device recipe)."""
    out, work = tmp_path / "out", tmp_path / "work"
    base = [sys.executable, str(SCRIPT), "--work", str(work), "--device", "cpu",
            "--d-model", "64", "--layers", "4", "--heads", "4", "--seq-len", "384", "--micro-batch", "2",
            "--grad-accum", "1", "--max-steps", "3", "--data-tokens", "20000", "--lengths", "256,512",
            "--samples", "1", "--jobs", "2"]
    for arch in ap_archs():
        run = subprocess.run([*base, "--out", str(out / arch), "--archs", arch, "--reuse-data"], check=True,
                             timeout=600, capture_output=True, text=True)
        assert ("reusing" in run.stdout) == (arch == "transformer"), run.stdout
    subprocess.run([*base, "--out", str(out), "--combine", *(str(out / a / "arch-phonebook.json")
                                                            for a in ap_archs())], check=True, timeout=60)
    result = json.loads((out / "arch-phonebook.json").read_text())
    assert result["data"]["aligned"] and result["train"]["steps"] == 3
    assert set(result["accuracy"]) == {"sambay-da", "transformer"}
    assert all(set(acc) == {"256", "512"} for acc in result["accuracy"].values())
    assert all(set(d) == {"256", "512"} and all(0 <= x <= 10 for x in d.values())
               for d in result["leading_digits"].values()) and set(result["leading_digits"]) == set(ap_archs())
    assert np.isfinite([r["loss"] for r in result["train"]["runs"].values()]).all()


def ap_archs() -> list[str]:
    return ["sambay-da", "transformer"]
