"""Phonebook and NIAH prompts: deterministic per seed, the needle where the depth says, the length filled
to the target; grading; training documents; and `sambay eval phonebook` end to end with its plot."""

from __future__ import annotations

import json

import pytest

from sambay.cli.__main__ import main as sambay_main
from sambay.eval import retrieval
from sambay.eval.retrieval import accuracy_by_length, is_correct, make_sample, make_samples, training_documents

pytest.importorskip("faker")


@pytest.mark.parametrize("task", retrieval.TASKS)
def test_generation_is_deterministic_per_seed(task, tokenizer):
    a = make_samples(task, tokenizer, [512, 768], samples=3, seed=7)
    assert a == make_samples(task, tokenizer, [512, 768], samples=3, seed=7)
    b = make_samples(task, tokenizer, [512, 768], samples=3, seed=8)
    assert [s.prompt for s in a] != [s.prompt for s in b]
    # a sample does not depend on which others are generated beside it
    assert make_sample(task, tokenizer, 768, 2, a[5].depth, seed=7) == a[5]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_phonebook_needle_sits_at_the_stated_depth(depth, tokenizer):
    s = make_sample("phonebook", tokenizer, 1024, 0, depth, seed=1)
    book, examples, question = s.prompt.split("\n\n")
    lines = book.split("\n")
    assert len(lines) == s.units and lines[s.needle_index] == s.needle
    assert s.needle_index == round(depth * (s.units - 1))
    name, number = s.needle.split(": ")
    assert question == f"{name}:" and number == s.answer and len(number) == 10 and number[0] in "6789"
    assert all(line in lines for line in examples.split("\n")) and s.needle not in examples
    assert len({line.split(":")[0] for line in lines}) == len(lines)  # names are unique
    assert 1024 - 32 < s.prompt_tokens == len(tokenizer.encode(s.prompt)) <= 1024


@pytest.mark.parametrize(("task", "depth"), [("niah_single", 0.0), ("niah_single", 0.75), ("niah_multikey", 0.4),
                                             ("niah_multikey", 1.0)])
def test_niah_needle_sits_at_the_stated_depth(task, depth, tokenizer):
    s = make_sample(task, tokenizer, 1024, 0, depth, seed=3, keys=4)
    context = s.prompt.removeprefix(retrieval.NIAH_INTRO).rsplit("\n", 1)[0]
    sentences = context.replace(". ", ".\n").split("\n")
    assert len(sentences) == s.units and sentences[s.needle_index] == s.needle
    assert s.needle_index == round(depth * (s.units - 1))
    assert s.needle.endswith(f"is: {s.answer}.") and s.prompt.count(s.answer) == 1
    key = s.needle.split(" for ")[1].split(" is:")[0]
    assert s.prompt.endswith(f"The special magic number for {key} mentioned in the provided text is")
    assert sum("special magic numbers for" in x for x in sentences) == (1 if task == "niah_single" else 4)
    assert 1024 - 40 < s.prompt_tokens <= 1024


def test_depths_spread_over_the_context():
    assert [retrieval.depth_of(k, 5) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert retrieval.depth_of(0, 1) == 0.5


def test_grading_and_accuracy_by_length():
    assert is_correct("phonebook", "6123456789", " 6123456789\nfoo")
    assert not is_correct("phonebook", "6123456789", " 61234567890")
    assert is_correct("niah_single", "1234567", " 1234567.")
    records = [{"length": n, "correct": c, "prompt_tokens": n - 3} for n, c in
               [(2048, True), (1024, True), (1024, False), (2048, True)]]
    assert accuracy_by_length(records) == {1024: {"accuracy": 0.5, "samples": 2, "mean_prompt_tokens": 1021},
                                           2048: {"accuracy": 1.0, "samples": 2, "mean_prompt_tokens": 2045}}


def test_training_documents_are_not_evaluation_samples(tokenizer):
    docs = training_documents("phonebook", tokenizer, [256, 512], count=4, seed=0)
    evals = {s.prompt for s in make_samples("phonebook", tokenizer, [256, 512], samples=4, seed=0)}
    assert len(docs) == 4 and not any(d.rsplit("\n", 1)[0].rsplit(" ", 1)[0] in evals for d in docs)
    for doc in docs:  # the answer follows the question, as a book line would
        question, answer = doc.rstrip("\n").rsplit("\n", 1)[1].split(": ")
        assert f"{question}: {answer}" in doc.split("\n\n")[0]
    assert docs == training_documents("phonebook", tokenizer, [256, 512], count=4, seed=0)


def test_cli_phonebook_with_plot_and_resume(tmp_path, capsys):
    out, plot = tmp_path / "pb.jsonl", tmp_path / "pb.png"
    argv = ["eval", "phonebook", "--lengths", "256,384", "--samples", "2", "--max-new-tokens", "12",
            "--out", str(out), "--json"]
    assert sambay_main([*argv, "--plot", str(plot)] if _has_matplotlib() else argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"phonebook"} and set(result["phonebook"]) == {"256", "384"}
    assert all(row["samples"] == 2 and 0 <= row["accuracy"] <= 1 for row in result["phonebook"].values())
    assert len(out.read_text().splitlines()) == 1 + 4
    if _has_matplotlib():
        assert plot.read_bytes().startswith(b"\x89PNG")
    assert sambay_main(argv) == 0  # everything is in the results file: nothing is generated again
    assert json.loads(capsys.readouterr().out) == result and len(out.read_text().splitlines()) == 1 + 4


def test_cli_writes_training_data(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    assert sambay_main(["eval", "niah", "--write-data", str(path), "--count", "5", "--lengths", "512"]) == 0
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(docs) == 5 and all(d.startswith(retrieval.NIAH_INTRO) for d in docs)
    assert json.loads(capsys.readouterr().out)["tasks"] == ["niah_single", "niah_multikey"]


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_training_documents_with_more_lookups(tokenizer):
    """--queries: each added line is another line of the same book, the document keeps within its length, and
    the stream is as deterministic as without."""
    docs = training_documents("phonebook", tokenizer, [384, 512], count=4, seed=0, queries=6)
    assert docs == training_documents("phonebook", tokenizer, [384, 512], count=4, seed=0, queries=6)
    for doc, length in zip(docs, [384, 512, 384, 512], strict=True):
        assert len(tokenizer.encode(doc)) <= length
        book, rest = doc.split("\n\n", 1)
        lookups = rest.split("\n\n", 1)[1].rstrip("\n").split("\n")[1:]  # after the question and its answer
        assert 1 <= len(lookups) <= 6 and all(line in book.split("\n") for line in lookups)
    with pytest.raises(ValueError, match="phonebook"):
        training_documents("niah_single", tokenizer, [256], count=1, seed=0, queries=2)
    with pytest.raises(ValueError, match="queries must be >= 0"):
        training_documents("phonebook", tokenizer, [384], count=1, seed=0, queries=-1)


def test_cli_refuses_negative_queries(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sambay_main(["eval", "phonebook", "--write-data", str(tmp_path / "d.jsonl"), "--lengths", "384",
                     "--queries", "-1"])
    assert exit_info.value.code == 2 and "--queries" in capsys.readouterr().err
    assert not (tmp_path / "d.jsonl").exists()
