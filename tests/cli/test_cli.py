"""`sambay generate` and `sambay chat` end to end in a subprocess, on a tiny random model with the real
tokenizer files; plus the chat loop's Ctrl-C and EOF handling in-process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sambay
from sambay.cli import __main__ as cli
from sambay.cli import chat
from sambay.generate import Engine, SamplingParams
from sambay.text.reasoning import split_reasoning
from sambay.tokenizer import write_tokenizer_json
from tests.conftest import RELEASED_CONFIG_DIR, random_model, small_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random model with the release's vocabulary size (tiny width), and the release's tokenizer files."""
    directory = tmp_path_factory.mktemp("tiny-phi4")
    config = small_config(vocab_size=200064, d_model=16, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=256)
    sambay.save_model(random_model(config), directory)
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(RELEASED_CONFIG_DIR / name, directory / name)
    write_tokenizer_json(directory)  # loads in ~3 s, against ~8 s for the o200k ranks route
    return directory


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine.load(model_dir, progress=False)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sambay.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_generate_json(model_dir, engine):
    result = run("generate", "--model", str(model_dir), "--json", "--n", "2", "--temperature", "0",
                 "--max-new-tokens", "5", "What is 2 + 2?")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert out["prompt_tokens"] == len(prompt) and out["completion_tokens"] == 10
    assert [c["index"] for c in out["choices"]] == [0, 1]
    first, second = out["choices"]
    assert first == {**second, "index": 0}  # greedy: both samples agree
    assert first["finish_reason"] == "length" and first["completion_tokens"] == 5
    [[expected]] = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=5))
    split = split_reasoning(expected.text)
    assert (first["reasoning"], first["content"]) == (split.reasoning, split.content)
    assert set(out["timing"]) == {"load_s", "prefill_s", "total_s", "tokens_per_s"}


def test_generate_raw_continues_plain_text(model_dir, engine):
    result = run("generate", "--model", str(model_dir), "--raw", "--temperature", "0", "--max-new-tokens", "6",
                 "Once upon a time")
    assert result.returncode == 0, result.stderr
    [[expected]] = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_new_tokens=6))
    assert result.stdout == expected.text + "\n"


def test_chat_through_stdin(model_dir):
    turns = "Hello there\n/reset\n/system Be brief.\nHi again\n/bogus\n/exit\nnever read\n"
    result = run("chat", "--model", str(model_dir), "--max-new-tokens", "4", "--seed", "0", stdin=turns)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(4 tokens, ") == 2 and "tokens/s)" in result.stdout
    assert "(conversation reset)" in result.stdout and "(system message set; conversation reset)" in result.stdout
    assert "unknown command /bogus" in result.stdout


def test_bad_flag_exits_2_with_one_line(model_dir):
    assert_one_line_error(run("generate", "--model", str(model_dir), "--bogus", "x"), 2,
                          "unrecognized arguments: --bogus")


def test_missing_model_directory_exits_1(tmp_path):
    assert_one_line_error(run("generate", "--model", str(tmp_path / "nope"), "hi"), 1, "does not exist")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["generate", "--model", "m", "--temperature", "-1", "hi"], 2, "temperature must be >= 0"),
    (["generate", "--model", "m", "--n", "0", "hi"], 2, "n must be an int >= 1"),
    (["generate", "--model", "m", "--raw", "--system", "s", "hi"], 2, "--system needs the chat template"),
    (["generate", "--model", "m", "--dtype", "int8", "hi"], 2, "invalid choice: 'int8'"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["chat", "--model", "."], 1, "has no config.json"),
])
def test_user_errors_are_one_line_messages(capsys, args, code, message):
    try:
        result = cli.main(args)
    except SystemExit as e:
        result = e.code
    err = capsys.readouterr().err
    assert result == code and err.count("\n") == 1 and message in err, err


def test_command_table_matches_the_modules():
    cli._check_commands()
    assert {"bench", "chat", "generate", "train"} <= set(cli.COMMANDS)


def run_chat_in_process(monkeypatch, capsys, engine: Engine, stdin: str) -> tuple[int, str]:
    monkeypatch.setattr(chat, "load_engine", lambda options, console: engine)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(["chat", "--model", "unused", "--max-new-tokens", "3", "--temperature", "0"])
    return code, capsys.readouterr().out


def test_chat_exits_cleanly_at_end_of_input(monkeypatch, capsys, engine):
    code, out = run_chat_in_process(monkeypatch, capsys, engine, "Hello\n")
    assert code == 0 and out.count("(3 tokens, ") == 1


def test_ctrl_c_stops_the_reply_not_the_program(monkeypatch, capsys, engine):
    stream = engine.stream
    turns = []

    def interrupted_once(prompts, params):
        turns.append(prompts[0])
        for i, step in enumerate(stream(prompts, params)):
            if len(turns) == 1 and i == 1:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(engine, "stream", interrupted_once)
    code, out = run_chat_in_process(monkeypatch, capsys, engine, "first\nsecond\n")
    assert code == 0 and "(reply interrupted)" in out and out.count("(3 tokens, ") == 1
    second_alone = engine.tokenizer.apply_chat_template([{"role": "user", "content": "second"}])
    assert turns[1] == second_alone  # the interrupted turn was dropped from the history
    assert not torch.is_inference_mode_enabled()
