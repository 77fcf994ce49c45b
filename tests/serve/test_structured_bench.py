"""`sambay bench-serve --json-schema FILE`: every request of the load carries the schema as its response_format,
the cost a grammar adds (issue 17's measurement, `benchmarks/serve_sweep.py --json-schema`). Against the live
test server (the release's 200K-token vocabulary, random weights): the benchmark's schema keeps every request
running to max_tokens, and a completion with it is JSON in the schema's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sambay.cli import __main__ as cli
from sambay.serve.loadgen import LoadConfig, _body
from tests.serve.conftest import MODEL

pytest.importorskip("llguidance")

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "schemas" / "steps.json"


def test_the_load_sends_the_schema_with_every_request():
    schema = json.loads(SCHEMA_FILE.read_text())
    body = _body(LoadConfig(json_schema=schema), MODEL, 3)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    assert "response_format" not in _body(LoadConfig(), MODEL, 3)


def test_bench_serve_with_a_json_schema(server, client, capsys):
    code = cli.main(["bench-serve", "--json", "--url", server.url, "--concurrency", "4", "--requests", "4",
                     "--max-tokens", "6", "--prompt-tokens", "8", "--json-schema", str(SCHEMA_FILE)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["completed"] == 4 and report["output_tokens"] == 24  # none stopped early
    schema = json.loads(SCHEMA_FILE.read_text())
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=12, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert r.choices[0].text.startswith('{"steps": ["') and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_an_unreadable_schema_file_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(SystemExit) as exited:
        cli.main(["bench-serve", "--json-schema", str(tmp_path / "bad.json")])
    assert exited.value.code == 2 and "--json-schema" in capsys.readouterr().err
