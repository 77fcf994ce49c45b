"""Where `sambay generate` reads its prompt (argument, ``-``, --prompt-file, piped stdin), --ignore-eos, and
its quiet exits: a reader that closes the pipe early (141) and Ctrl-C (130), never a traceback."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys

import pytest

from sambay.cli import __main__ as cli
from sambay.cli import generate
from sambay.generate import Engine, SamplingParams

FLAGS = ["--model", "unused", "--raw", "--temperature", "0", "--max-new-tokens", "4"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def generate_in_process(monkeypatch, capsys, engine):
    """``(argv, stdin) -> (exit code, stdout, stderr)`` of `sambay generate` on the tiny model, in-process."""
    monkeypatch.setattr(generate, "load_engine", lambda options, console: engine)

    def call(args: list[str], stdin: io.StringIO) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "stdin", stdin)
        try:
            code = cli.main(["generate", *args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return call


def continuation(engine: Engine, text: str) -> str:
    [[expected]] = engine.generate([text], SamplingParams(temperature=0, max_new_tokens=4))
    return expected.text + "\n"


@pytest.mark.parametrize(("args", "stdin"), [
    (["-"], "Once upon a time\n"),  # '-': stdin
    ([], "Once upon a time\r\n"),  # no prompt and stdin is not a terminal: stdin
    (["--prompt-file", "-"], "Once upon a time"),
    (["--prompt-file", "PROMPT_FILE"], ""),
])
def test_prompt_from_stdin_or_a_file(generate_in_process, engine, tmp_path, args, stdin):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Once upon a time\n\n", encoding="utf-8")  # trailing newlines dropped, as by $(cat FILE)
    args = [str(prompt_file) if a == "PROMPT_FILE" else a for a in args]
    code, out, err = generate_in_process([*FLAGS, *args], io.StringIO(stdin))
    assert code == 0, err
    assert out == continuation(engine, "Once upon a time")


def test_a_prompt_argument_leaves_stdin_alone(generate_in_process, engine):
    stdin = io.StringIO("not the prompt")
    code, out, _ = generate_in_process([*FLAGS, "Once upon a time"], stdin)
    assert code == 0 and out == continuation(engine, "Once upon a time") and stdin.tell() == 0


@pytest.mark.parametrize(("args", "stdin", "message"), [
    ([], _Terminal(), "no prompt: give it as an argument, with --prompt-file PATH, or on stdin"),
    ([], io.StringIO(" \n\n"), "the prompt from stdin is empty"),
    (["--prompt-file", "p.txt", "hi"], io.StringIO(), "as an argument or with --prompt-file, not both"),
    (["--tensor-parallel", "2", "-"], io.StringIO("hi"), "every process reads the prompt"),
])
def test_prompt_usage_errors(generate_in_process, args, stdin, message):
    code, out, err = generate_in_process([*FLAGS, *args], stdin)
    assert code == 2 and err.count("\n") == 1 and message in err and not out, err


def test_a_missing_prompt_file_exits_1(generate_in_process, tmp_path):
    code, _, err = generate_in_process([*FLAGS, "--prompt-file", str(tmp_path / "nope.txt")], io.StringIO())
    assert code == 1 and err.count("\n") == 1 and "nope.txt" in err, err


def sambay(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "sambay.cli", *args], env=env, **popen)


def test_piped_stdin_and_ignore_eos_on_the_default_model():
    """`echo "What is 308+94?" | sambay generate --ignore-eos`: the answer, then on to --max-new-tokens (the
    model stops after 73 tokens otherwise)."""
    process = sambay("generate", "--json", "--temperature", "0", "--ignore-eos", "--max-new-tokens", "80",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate("What is 308+94?\n", timeout=300)
    assert process.returncode == 0, err
    [choice] = json.loads(out)["choices"]
    assert choice["finish_reason"] == "length" and choice["completion_tokens"] == 80
    assert choice["reasoning"].strip().endswith("so 308+94=402") and choice["content"].startswith("402")


def streaming_generation(**popen) -> subprocess.Popen:
    """`sambay generate` on the default model, streaming thousands of tokens, after its first output byte."""
    process = sambay("generate", "--raw", "--ignore-eos", "--temperature", "0", "--max-new-tokens", "4000", "12+7=",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
    assert process.stdout.read(1), process.stderr.read().decode()
    return process


def test_a_reader_that_leaves_early_ends_it_quietly_with_141():
    """`sambay generate ... | head -c 1`: exit 128 + SIGPIPE, no "Broken pipe" message."""
    process = streaming_generation()
    process.stdout.close()  # the reader leaves: the next write gets EPIPE
    err = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 141 and err == "", err


def test_ctrl_c_while_generating_exits_130_without_a_traceback():
    process = streaming_generation()
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_ctrl_c_anywhere_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "main", interrupted)
    assert cli.main(["generate", "hi"]) == 130
    monkeypatch.setattr(cli, "_module", interrupted)  # Ctrl-C while the subcommands import torch and the rest
    assert cli.main(["generate", "hi"]) == 130
    assert capsys.readouterr() == ("", "")


def test_the_entry_point_imports_the_subcommands_inside_main():
    """Importing `sambay.cli.__main__` (the console script's first step) leaves the heavy imports to `main`,
    where Ctrl-C is handled."""
    check = ("import sys, sambay.cli.__main__; "
             "print(sorted(m for m in sys.modules if m.startswith(('sambay.cli.', 'sambay.generate', 'rich'))))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "['sambay.cli.__main__']", done.stderr
