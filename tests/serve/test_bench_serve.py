"""`sambay bench-serve` against the live test server: a small bounded run completes and reports numbers;
non-loopback targets are refused."""

from __future__ import annotations

import json

import pytest

from sambay.cli import __main__ as cli


def test_bench_serve_reports_throughput_and_latency(server, capsys):
    code = cli.main(["bench-serve", "--url", server.url, "--concurrency", "4", "--requests", "8",
                     "--max-tokens", "4", "--prompt-words", "4", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["completed"] == 8 and report["output_tokens"] == 32
    assert report["requests_per_s"] > 0 and report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p90"] > 0


def test_bench_serve_splits_the_load_over_worker_processes(server, capsys):
    code = cli.main(["bench-serve", "--url", server.url, "--concurrency", "4", "--requests", "6",
                     "--max-tokens", "3", "--prompt-words", "4", "--workers", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["client_processes"] == 2 and report["completed"] == 6
    assert report["output_tokens"] == 18 and len(report["errors"]) == 0


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000"])
def test_bench_serve_targets_loopback_only(url, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench-serve", "--url", url])
    assert exit_info.value.code == 2 and "loopback" in capsys.readouterr().err
