"""`sambay bench-serve` against the live test server: bounded runs complete and report numbers, in both
load modes (fixed concurrency, Poisson request rate), with word and token-id prompts, over one or two
client processes; failures are counted by message; the bandwidth limit is reported given the model
directory; workload presets yield to explicit flags; non-loopback targets are refused."""

from __future__ import annotations

import argparse
import json

import pytest

from sambay.cli import __main__ as cli
from sambay.cli import bench_serve
from sambay.serve.loadgen import arrival_offsets


def bench(capsys, *flags: str) -> tuple[int, dict]:
    code = cli.main(["bench-serve", "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_bench_serve_reports_throughput_and_latency(server, capsys):
    code, report = bench(capsys, "--url", server.url, "--concurrency", "4", "--requests", "8", "--max-tokens", "4",
                         "--prompt-words", "4", "16")
    assert code == 0 and report["completed"] == 8 and report["output_tokens"] == 32
    assert report["requests_per_s"] > 0 and report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p90"] > 0
    assert report["latency_ms"]["p99"] >= report["ttft_ms"]["p99"] and 0 < report["mean_in_flight"] <= 4
    assert report["mean_output_tokens"] == 4 and report["mean_prompt_tokens"] > 4
    assert "bandwidth_limit" not in report  # no --model-dir


def test_token_prompts_and_the_bandwidth_limit(server, model_dir, capsys):
    code, report = bench(capsys, "--url", server.url, "--concurrency", "2", "--requests", "4", "--max-tokens", "3",
                         "--prompt-tokens", "8", "24", "--model-dir", str(model_dir), "--bandwidth", "1e12")
    assert code == 0 and report["completed"] == 4 and report["prompt_unit"] == "tokens"
    assert report["mean_prompt_tokens"] == 16 and report["mean_output_tokens"] == 3
    limit = report["bandwidth_limit"]
    assert limit["mean_context"] == 18 and limit["batch"] == report["mean_in_flight"]  # 16 + 3 / 2, rounded
    assert limit["bandwidth_bytes_per_s"] == 1e12 and limit["weight_bytes"] > 0
    assert limit["fraction_of_limit"] == pytest.approx(report["output_tokens_per_s"]
                                                       / limit["limit_output_tokens_per_s"], rel=1e-3)


def test_poisson_request_rate(server, capsys):
    code, report = bench(capsys, "--url", server.url, "--request-rate", "40", "--seed", "3", "--requests", "6",
                         "--max-tokens", "2", "--prompt-tokens", "4")
    assert code == 0 and report["completed"] == 6 and report["request_rate"] == 40 and report["concurrency"] is None
    assert report["duration_s"] >= arrival_offsets(6, 40, seed=3)[-1]  # the last request left on schedule


def test_bench_serve_splits_the_load_over_worker_processes(server, capsys):
    """Two processes share one schedule of Poisson arrivals and the concurrency cap; samples are merged."""
    code, report = bench(capsys, "--url", server.url, "--request-rate", "50", "--concurrency", "4", "--requests", "6",
                         "--max-tokens", "3", "--prompt-tokens", "5", "--workers", "2")
    assert code == 0 and report["client_processes"] == 2 and report["completed"] == 6
    assert report["output_tokens"] == 18 and report["mean_prompt_tokens"] == 5 and report["errors"] == {}


def test_failures_are_counted_by_message(server, capsys):
    code, report = bench(capsys, "--url", server.url, "--concurrency", "2", "--requests", "3", "--max-tokens", "2",
                         "--prompt-tokens", "600")  # over the test server's 512-token context
    assert code == 1 and report["completed"] == 0 and report["failed"] == 3
    [(message, count)] = report["errors"].items()
    assert message.startswith("HTTP 413: the prompt has 600 tokens") and count == 3


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    return parser.parse_args(list(flags))


def test_workloads_and_overrides():
    paper = bench_serve.load_config(parse("--workload", "paper"))
    assert (paper.prompt_lengths, paper.prompt_unit, paper.max_tokens, paper.temperature) == ((2048,), "tokens",
                                                                                              32768, 0.0)
    assert paper.concurrency == 8 and paper.request_rate is None and paper.timeout_s == 3600
    custom = bench_serve.load_config(parse("--workload", "paper", "--max-tokens", "100", "--prompt-words", "10",
                                           "--timeout", "60", "--request-rate", "2"))
    assert (custom.prompt_lengths, custom.prompt_unit, custom.max_tokens, custom.timeout_s) == ((10,), "words", 100,
                                                                                                60)
    assert custom.request_rate == 2 and custom.concurrency is None  # a rate: no cap unless given
    default = bench_serve.load_config(parse())
    assert (default.prompt_lengths, default.max_tokens, default.concurrency) == ((16, 64, 128), 64, 8)
    with pytest.raises(SystemExit):
        parse("--prompt-words", "4", "--prompt-tokens", "4")  # one or the other


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000"])
def test_bench_serve_targets_loopback_only(url, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench-serve", "--url", url])
    assert exit_info.value.code == 2 and "loopback" in capsys.readouterr().err


@pytest.mark.parametrize("with_model", [False, True])
def test_text_report(server, model_dir, with_model, capsys):
    flags = ["--model-dir", str(model_dir)] if with_model else []
    code = cli.main(["bench-serve", "--url", server.url, "--concurrency", "2", "--requests", "2", "--max-tokens", "2",
                     "--prompt-tokens", "4", *flags])
    text = capsys.readouterr().out
    assert code == 0 and "2/2 requests at concurrency 2" in text and "end-to-end latency ms: p50" in text
    assert ("reached" in text) == with_model and ("not computed (pass --model-dir)" in text) != with_model
