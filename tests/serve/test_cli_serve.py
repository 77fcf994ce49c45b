"""`sambay serve` refuses what it cannot honour before loading the model or binding a port: capacity flags,
a busy port; accepts ``--model DIR/config.json``; and its --help shows every flag's default."""

from __future__ import annotations

import argparse
import socket

import pytest

from sambay.cli import __main__ as cli
from sambay.cli import serve
from sambay.cli._common import add_model_arguments, add_sampling_arguments
from tests.serve.conftest import MODEL

# --port 0: the port check before loading the model must not depend on port 8000 being free on this machine


@pytest.mark.parametrize(("flags", "message"), [
    (["--cache-memory-gb", "0.0000001"], "constant state"),  # not even the slots' Mamba and window state
    (["--cache-memory-gb", "0.0001"], "less than one sequence"),  # some blocks, not a max-length sequence
    (["--cache-memory-gb", "0.05", "--slots", "2", "--max-length", "512", "--block-size", "16"], None),
    (["--block-size", "24"], "power of two"),
])
def test_capacity_flags(model_dir, capsys, served, flags, message):
    command = ["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", *flags]
    if message is None:  # a budget that fits: the pool is what remains after the slots' state
        assert cli.main(command) == 0
        [runtime] = served
        memory = runtime.scheduler.memory
        assert memory.slots == 2 and 0 < memory.total_bytes <= 0.05e9 and memory.kv_blocks >= 512 // 16
        return
    with pytest.raises(SystemExit) as exit_info:
        cli.main(command)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err and not served


@pytest.mark.parametrize("engine_process", ["--no-engine-process", "--engine-process"])
def test_a_busy_port_is_reported_before_the_model_loads(model_dir, capsys, monkeypatch, served, engine_process):
    monkeypatch.setattr(serve, "load_engine", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr("sambay.serve.engine_process.RemoteScheduler", lambda *a: pytest.fail("the model loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", str(port), engine_process])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"127.0.0.1:{port}" in err and f"port {port}" in err, err
    assert not served


def test_model_may_name_config_json(model_dir, served):
    assert cli.main(["serve", "--model", str(model_dir / "config.json"), "--device", "cpu", "--port", "0"]) == 0
    [runtime] = served
    assert runtime.model_name == MODEL  # the directory's name, as with --model DIR


def test_a_file_outside_a_model_directory_is_named(tmp_path, capsys, served):
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"")
    assert cli.main(["serve", "--model", str(stray), "--device", "cpu", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert f"expected a model directory, got a file: {stray}; use its directory" in err and not served


def test_every_serve_flag_shows_its_default():
    shared = argparse.ArgumentParser()  # the model and sampling flags every generation command shares
    add_model_arguments(shared)
    add_sampling_arguments(shared)
    theirs = {option for action in shared._actions for option in action.option_strings}
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    ours = [action for action in parser._actions
            if action.option_strings and not set(action.option_strings) & theirs and action.dest != "help"]
    assert len(ours) > 10
    assert [a.option_strings[0] for a in ours if "default" not in (a.help or "")] == []
    assert "seconds to finish requests on SIGTERM (default: 30)" in " ".join(parser.format_help().split())
