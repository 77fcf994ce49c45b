"""`sambay bench` tells the user what it does and does not do: it refuses the full run on a CPU (naming
--smoke), skips the HF baselines cleanly without transformers, and says when bench.png needs matplotlib."""

from __future__ import annotations

import sys

import pytest
import torch

from sambay.bench import report, suite
from sambay.cli import __main__ as cli

RESULT = {"config": {}, "hardware": {"device": "cpu"}, "rows": [
    {"system": "sambay", "kind": "decode", "batch": b, "context": 16, "step_s": 0.01 * b, "tokens_per_s": 100.0}
    for b in (1, 2)]}


@pytest.fixture
def fake_suite(monkeypatch):
    """`suite.run` replaced by one that returns RESULT at once; the configs it was given are recorded."""
    calls = []
    monkeypatch.setattr(suite, "run", lambda bench, checkpoint=None: calls.append(bench) or RESULT)
    return calls


def test_full_bench_on_a_cpu_is_refused_naming_smoke(monkeypatch, capsys, tmp_path, fake_suite):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--smoke" in err and "--allow-cpu" in err
    assert not fake_suite and not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--smoke", "--allow-cpu"])
def test_smoke_or_allow_cpu_runs_on_a_cpu(monkeypatch, capsys, tmp_path, fake_suite, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--out", str(tmp_path), flag]) == 0
    [bench] = fake_suite
    assert bench.smoke == (flag == "--smoke")
    assert "wrote bench.json, bench.md" in capsys.readouterr().out


def test_hf_baselines_are_skipped_without_transformers(monkeypatch):
    monkeypatch.setattr(suite, "has_transformers", lambda: False)
    monkeypatch.setattr(suite.subprocess, "run", lambda *a, **k: pytest.fail("no subprocess without transformers"))
    rows = suite._hf_rows(suite.BenchConfig(smoke=True))
    assert {r["system"] for r in rows} == {"hf-phi3-eager", "hf-phi3-compile"}
    table = report.table({**RESULT, "rows": RESULT["rows"] + rows})
    assert table.count("| skipped: transformers not installed |") == 2 and "Traceback" not in table


def test_a_failed_hf_baseline_shows_its_exception_not_a_traceback(monkeypatch):
    class Done:
        returncode, stdout = 1, ""
        stderr = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: CUDA driver too old\n'

    monkeypatch.setattr(suite, "has_transformers", lambda: True)
    monkeypatch.setattr(suite.subprocess, "run", lambda *a, **k: Done())
    rows = suite._hf_rows(suite.BenchConfig(smoke=True))
    assert rows[0]["error"] == "failed: RuntimeError: CUDA driver too old" and "Traceback" in rows[0]["stderr"]
    assert "Traceback" not in report.table({**RESULT, "rows": rows})


def test_without_matplotlib_the_output_says_the_plot_needs_it(monkeypatch, capsys, tmp_path, fake_suite):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    assert not report.can_plot()
    assert cli.main(["bench", "--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bench.png not written: the plot needs matplotlib (pip install 'sambay[plot]')" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]


def test_with_matplotlib_bench_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    markdown, notes = report.write(RESULT, tmp_path)
    assert (tmp_path / "bench.png").stat().st_size > 0 and "| sambay | 2 | 16 |" in markdown
    assert notes == [f"wrote bench.json, bench.md, bench.png in {tmp_path}"]


def test_compile_without_formats_is_a_usage_error(capsys, tmp_path, fake_suite):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--smoke", "--compile", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--formats" in capsys.readouterr().err and not fake_suite


@pytest.mark.slow
def test_formats_compare_weight_formats_against_their_own_limits(monkeypatch, capsys, tmp_path):
    """`--formats`: the same tiny model in each weight format, its weights' bytes counted as stored, a decode
    and a prefill row for each."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--smoke", "--formats", "bf16", "bf16-gemv", "int8", "int4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = __import__("json").loads((tmp_path / "bench.json").read_text())["rows"]
    weights = {r["system"]: r["bytes"] for r in rows if r["kind"] == "weights"}
    assert list(weights) == ["sambay-bf16", "sambay-bf16-gemv", "sambay-int8", "sambay-int4"]
    assert weights["sambay-bf16"] == weights["sambay-bf16-gemv"] > weights["sambay-int8"] > weights["sambay-int4"]
    for system in weights:
        assert f"| {system} | 1 | 16 |" in out and f"| {system} | 16 |" in out  # decode, then prefill
    assert "| weights" in out and "int4" in out


def test_a_failed_decode_row_is_recorded_and_the_run_goes_on(monkeypatch, capsys, tmp_path):
    """A measurement that raises (a failed CUDA graph capture on the H200, once) becomes an error row: the
    other rows, the prefill and bench.json are still there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = suite.runs.decode_step_seconds

    def flaky(model, batch, context, *args):
        if batch == 1:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nmore")
        return real(model, batch, context, *args)

    monkeypatch.setattr(suite.runs, "decode_step_seconds", flaky)
    assert cli.main(["bench", "--smoke", "--formats", "bf16", "--out", str(tmp_path)]) == 0
    rows = __import__("json").loads((tmp_path / "bench.json").read_text())["rows"]
    decode = [r for r in rows if r["kind"] == "decode"]
    failed = [r for r in decode if "error" in r]
    assert failed and all(r["batch"] == 1 for r in failed)
    assert failed[0]["error"] == "RuntimeError: CUDA error: operation failed due to a previous error during capture"
    assert any("tokens_per_s" in r for r in decode) and any(r["kind"] == "prefill" for r in rows)
    assert "operation failed" in capsys.readouterr().out


def test_a_group_size_that_does_not_fit_is_refused_before_any_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "run_formats", lambda *a, **k: pytest.fail("no run with a bad group size"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--formats", "bf16", "int4", "--group-size", "96", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--group-size 96" in err and err.count("\n") == 1


def test_prefill_profile_splits_a_prefill_into_families_and_renders():
    """`prefill_profile` (the longest prefill of `sambay bench --formats`, on a GPU): here on the CPU with the
    tiny model, the operators' self time; its families cover the whole time, and the table shows it."""
    import torch

    from sambay.bench.profile import kernel_family, prefill_profile
    from sambay.config import TINY
    from sambay.model.sambay import SambaY

    model = SambaY(TINY, backend="reference").init_weights(torch.Generator().manual_seed(0)).eval()
    prof = prefill_profile(model, 48)
    assert prof["context"] == 48 and prof["kernels"] > 10 and prof["kernel_ms"] > 0
    assert sum(prof["families"].values()) == pytest.approx(prof["kernel_ms"])
    assert {"matmul", "attention"} <= set(prof["families"])  # the CPU scan is plain aten ops: "other" here
    assert kernel_family("nvjet_sm90_tst_128x8") == "matmul" and kernel_family("_scan_chunk") == "scan"
    assert kernel_family("_lookback") == kernel_family("_single_pass") == "scan"
    table = report.table({**RESULT, "rows": [{"system": "sambay-bf16", "kind": "prefill-profile", **prof}]})
    assert "Profile of one prefill (sambay-bf16, 48 tokens)" in table and "matmul" in table


def test_sweep_knobs_checks_each_setting_against_the_current_one():
    """The module's current setting is timed first; a setting whose output differs is an error row, a failing
    one too, and the sweep goes on; the knobs end at the last setting tried."""
    from types import SimpleNamespace

    from sambay.bench.sweep import sweep_knobs

    knobs = SimpleNamespace(BLOCK=2, WARPS=4)

    def case():
        if knobs.WARPS == 8:
            raise RuntimeError("out of shared memory")
        return torch.full((3,), 1.0 + (knobs.BLOCK == 3))  # BLOCK 3 computes something else

    seen = []
    rows = sweep_knobs(knobs, {"BLOCK": (1, 2, 3), "WARPS": (4, 8)}, {"c": case}, lambda fn: 10.0 * knobs.BLOCK,
                       "ms", max_seconds=60, on_row=seen.append)
    assert seen == rows and len(rows) == 7 and rows[0] == {"BLOCK": 2, "WARPS": 4, "ms": {"c": 20.0}}
    for row in rows[1:]:
        if row["WARPS"] == 8:
            assert row["error"] == "out of shared memory"
        elif row["BLOCK"] == 3:
            assert "max abs error 1 against the default setting" in row["error"]
        else:
            assert row["ms"] == {"c": 10.0 * row["BLOCK"]} and "error" not in row
    assert (rows[-1]["BLOCK"], rows[-1]["WARPS"]) == (knobs.BLOCK, knobs.WARPS)
    knobs.BLOCK, knobs.WARPS = 2, 4
    assert sweep_knobs(knobs, {"BLOCK": (1, 2), "WARPS": (4,)}, {"c": case}, lambda fn: 1.0, "ms", -1) == []
