"""`sambay eval` wiring: perplexity end to end on the embedded model, and usage errors in one line."""

from __future__ import annotations

import json
import math

import pytest

from sambay.cli.__main__ import main as sambay_main
from sambay.cli._common import UsageError
from sambay.cli.eval import _lengths
from tests.eval.conftest import write_jsonl


def test_perplexity_of_the_embedded_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "<think>\n2+3, add digit by digit from the right:\n"
                                                  "2+3=5 → 5\nso 2+3=5\n</think>\n5"}, {"text": "What is 4+4?"}])
    assert sambay_main(["eval", "perplexity", "--data", str(data), "--window", "16", "--stride", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 2 and result["window"] == 16 and result["stride"] == 8
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert 0 < result["loss"] < 3  # its own worked-solution format: low loss


@pytest.mark.parametrize(("argv", "message"), [
    (["reasoning", "--data", "x.jsonl", "--prompt", "no placeholder"], "{problem} placeholder"),
    (["reasoning", "--data", "x.jsonl", "--n", "0"], "--n: must be an integer >= 1"),
    (["phonebook", "--samples", "-3"], "--samples: must be an integer >= 1"),
    (["phonebook", "--lengths", "1K,abc"], "expected numbers like"),
    (["niah", "--write-data", "out.jsonl"], "--write-data needs --lengths"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        sambay_main(["eval", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_lengths():
    assert _lengths("1K,2k,4096,1K", None) == [1024, 2048, 4096]
    assert _lengths(None, 5000) == [1024, 2048, 4096]
    with pytest.raises(UsageError, match="exceed"):
        _lengths("8K", 4064)
