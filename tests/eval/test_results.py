"""The resumable results file: records survive reopening, a torn last line is dropped, other settings refused."""

from __future__ import annotations

import json

import pytest

from sambay.eval.results import ResultsFile

HEADER = {"task": "math", "sampling": {"temperature": 0.6, "seed": 0}}


def test_records_come_back_by_key(tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    with ResultsFile(path, HEADER, ("problem", "sample")) as results:
        assert results.open() == {}
        results.append({"problem": 0, "sample": 1, "correct": True})
        results.append({"problem": 2, "sample": 0, "correct": False})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"header": HEADER} and len(lines) == 3
    with ResultsFile(path, HEADER, ("problem", "sample")) as results:
        done = results.open()
        assert set(done) == {(0, 1), (2, 0)} and done[(2, 0)]["correct"] is False
        results.append({"problem": 1, "sample": 0, "correct": True})
    assert len(path.read_text().splitlines()) == 4  # no second header


def test_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile(path, HEADER, ("problem", "sample")) as results:
        results.open()
        results.append({"problem": 0, "sample": 0, "correct": True})
    with open(path, "a") as f:
        f.write('{"problem": 0, "sample": 1, "corr')  # killed in the middle of a write
    with ResultsFile(path, HEADER, ("problem", "sample")) as results:
        assert set(results.open()) == {(0, 0)}
        results.append({"problem": 0, "sample": 1, "correct": False})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1] == {"problem": 0, "sample": 1, "correct": False} and len(records) == 3


def test_a_file_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile(path, HEADER, ("problem", "sample")) as results:
        results.open()
    other = {"task": "math", "sampling": {"temperature": 1.0, "seed": 0}}
    with pytest.raises(ValueError, match=r"sampling\.temperature: 0\.6 → 1\.0"):
        ResultsFile(path, other, ("problem", "sample")).open()
    (tmp_path / "notes.txt").write_text("not a results file\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        ResultsFile(tmp_path / "notes.txt", HEADER, ("problem",)).open()


def test_no_path_keeps_nothing(tmp_path):
    results = ResultsFile(None, HEADER, ("problem",))
    assert results.open() == {}
    results.append({"problem": 0})
    assert list(tmp_path.iterdir()) == []
