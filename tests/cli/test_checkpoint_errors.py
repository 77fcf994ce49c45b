"""A hostile checkpoint through the CLI (issue 13): one line on stderr, no traceback, exit 1; and `sambay serve`
refuses a context whose cache cannot fit, naming --max-length, before the model loads."""

from __future__ import annotations

import json
import shutil

import pytest

from sambay.cli import __main__ as cli
from sambay.cli import serve
from tests.cli.conftest import assert_one_line_error, run


@pytest.fixture
def hostile(model_dir, tmp_path):
    """A copy of the CLI test model to break."""
    return shutil.copytree(model_dir, tmp_path / "model")


def _set_config(path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _header_list(path) -> None:
    """The shard's JSON header becomes a list (its data section kept)."""
    [shard] = path.glob("*.safetensors")
    raw = shard.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    shard.write_bytes(len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]" + data)


@pytest.mark.parametrize(("mutate", "message"), [
    (_header_list, "the header must be a JSON object"),
    (lambda path: (path / "config.json").write_text("[1, 2]"), "config.json must be a JSON object"),
    (lambda path: _set_config(path, num_hidden_layers=10**9), "num_hidden_layers is 1000000000"),
], ids=["header-list", "config-list", "layers-1e9"])
def test_a_hostile_checkpoint_is_one_line_and_exit_1(hostile, mutate, message):
    mutate(hostile)
    assert_one_line_error(run("generate", "--model", str(hostile), "hi"), 1, message)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if `sambay serve` gets as far as loading the model, in this process or another."""
    pytest.importorskip("fastapi")
    monkeypatch.setattr(serve, "load_engine", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr("sambay.serve.engine_process.RemoteScheduler", lambda *a: pytest.fail("the model loaded"))


@pytest.mark.parametrize(("flags", "message"), [
    ([], "config.json's max_position_embeddings (2147483647): the K/V cache of --slots 8 sequences"),
    (["--engine-process"], "set --max-length to the context you need"),
    (["--max-length", "2000000000", "--slots", "4"], "--max-length 2000000000: the K/V cache of --slots 4"),
], ids=["default-length", "engine-process", "explicit-length"])
def test_serve_names_the_flag_for_a_context_that_cannot_fit(hostile, capsys, no_loading, flags, message):
    _set_config(hostile, max_position_embeddings=2**31 - 1)  # the largest config.json may declare: 4.4 TB of K/V
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--model", str(hostile), "--device", "cpu", "--port", "0", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def _reached_loading(*args, **kwargs):
    raise RuntimeError("reached loading")


def test_serve_with_max_length_gets_past_the_check(hostile, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    _set_config(hostile, max_position_embeddings=2**31 - 1)
    monkeypatch.setattr(serve, "load_engine", _reached_loading)
    assert cli.main(["serve", "--model", str(hostile), "--device", "cpu", "--port", "0", "--max-length", "256"]) == 1
    assert "reached loading" in capsys.readouterr().err
