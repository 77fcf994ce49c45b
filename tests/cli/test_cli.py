"""`sambay generate` and `sambay chat` end to end in a subprocess, on a tiny random model with the real
tokenizer files; plus the chat loop's Ctrl-C and EOF handling in-process."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from sambay.cli import __main__ as cli
from sambay.cli import chat
from sambay.generate import Engine, SamplingParams
from sambay.text.reasoning import split_reasoning
from tests.cli.conftest import assert_one_line_error, run


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
    timing = out["timing"]
    assert set(timing) == {"load_s", "prefill_s", "decode_s", "total_s", "prompt_tokens_per_s",
                           "decode_tokens_per_s", "tokens_per_s"}
    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0
    assert timing["prefill_s"] + timing["decode_s"] == pytest.approx(timing["total_s"], abs=2e-4)
    # llama.cpp's split: prompt tokens over the time to the first token; the tokens after the first step (one
    # per sample) over the time after it; the end-to-end figure as before
    assert timing["prompt_tokens_per_s"] == pytest.approx(len(prompt) / timing["prefill_s"], rel=0.01)
    assert timing["decode_tokens_per_s"] == pytest.approx((10 - 2) / timing["decode_s"], rel=0.01)
    assert timing["tokens_per_s"] == pytest.approx(10 / timing["total_s"], rel=0.01)


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
    assert result.stdout.count("(4 tokens, ") == 2 and "tokens/s; prompt " in result.stdout
    assert "(conversation reset)" in result.stdout and "(system message set; conversation reset)" in result.stdout
    assert "unknown command /bogus" in result.stdout


def test_bad_flag_exits_2_with_one_line(model_dir):
    assert_one_line_error(run("generate", "--model", str(model_dir), "--bogus", "x"), 2,
                          "unrecognized arguments: --bogus")


def test_missing_model_directory_exits_1(tmp_path):
    assert_one_line_error(run("generate", "--model", str(tmp_path / "nope"), "hi"), 1, "does not exist")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["generate", "--model", "m", "--temperature", "-1", "hi"], 2, "temperature must be a finite number >= 0"),
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
