"""`sambay quantize` end to end in a subprocess: quantise the tiny model, generate from the result with
``--model``, the same with an AWQ calibration file, and the one-line errors for bad arguments."""

from __future__ import annotations

import json

import pytest

from sambay.generate import Engine, SamplingParams
from tests.cli.conftest import assert_one_line_error, run


def _generates_as_loaded(dst):
    """`sambay generate --model DST` prints what the engine loaded from DST generates."""
    result = run("generate", "--model", str(dst), "--raw", "--temperature", "0", "--max-new-tokens", "5",
                 "Once upon a time")
    assert result.returncode == 0, result.stderr
    [[expected]] = Engine.load(dst, progress=False).generate(
        ["Once upon a time"], SamplingParams(temperature=0, max_new_tokens=5))
    assert result.stdout == expected.text + "\n"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_then_generate(model_dir, tmp_path, bits):
    dst = tmp_path / f"int{bits}"
    result = run("quantize", str(model_dir), str(dst), "--bits", str(bits), "--group-size", "16")
    assert result.returncode == 0, result.stderr
    assert f"to {bits} bits (group size 16): wrote {dst}" in result.stdout
    assert json.loads((dst / "quantization_config.json").read_text())["bits"] == bits
    assert (dst / "tokenizer_config.json").is_file()
    _generates_as_loaded(dst)
    assert_one_line_error(run("quantize", str(dst), str(tmp_path / "again"), "--bits", "4", "--group-size", "16"),
                          1, "is already quantised (")


def test_bad_arguments(model_dir, tmp_path):
    assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "a"), "--bits", "3"), 2,
                          "argument --bits: invalid choice: 3")
    assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "b"), "--bits", "4"), 1,
                          "group size 128 does not divide the 16 inputs of")
    assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "c"), "--bits", "8", "--group-size", "5"),
                          2, "group size must be an even number")
    assert_one_line_error(run("quantize", str(model_dir), str(model_dir), "--bits", "8"), 2,
                          "exists and is not an empty directory")


def test_quantize_with_calibration(model_dir, tmp_path):
    """AWQ: the scale search runs on the text file, DST is "sambay-awq" with an input scale, and it generates."""
    text = tmp_path / "calibration.txt"
    text.write_text("Once upon a time there was a small model that learned to count. " * 20)
    dst = tmp_path / "awq"
    result = run("quantize", str(model_dir), str(dst), "--bits", "4", "--group-size", "16",
                 "--calibration", str(text), "--calibration-tokens", "200")
    assert result.returncode == 0, result.stderr
    assert f"calibrated on 200 tokens of {text}" in result.stdout and "-> " in result.stdout
    assert json.loads((dst / "quantization_config.json").read_text())["format"] == "sambay-awq"
    _generates_as_loaded(dst)
    for bad, what in ((tmp_path / "absent.txt", "cannot read it"), (tmp_path / "latin1.txt", "as UTF-8 text"),
                      (tmp_path / "empty.txt", "is empty")):
        if bad.name == "latin1.txt":
            bad.write_bytes("café".encode("latin-1"))
        elif bad.name == "empty.txt":
            bad.write_text("")
        assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "b"), "--bits", "4", "--group-size",
                                  "16", "--calibration", str(bad)), 2, what)
    assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "c"), "--bits", "4", "--group-size", "16",
                              "--calibration", str(text), "--calibration-tokens", "0"), 2,
                          "--calibration-tokens must be at least 1")
    assert_one_line_error(run("quantize", str(model_dir), str(tmp_path / "d"), "--bits", "8", "--group-size", "16",
                              "--calibration", str(text)), 2, "--calibration (AWQ) is offered at --bits 4 only")
