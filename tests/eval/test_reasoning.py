"""`sambay eval reasoning`: answer extraction, grading with Math-Verify after `</think>`, GPQA shuffling,
the embedded model on held-out arithmetic in the math format, and resuming an interrupted run."""

from __future__ import annotations

import json

import pytest

from sambay.cli.__main__ import main as sambay_main
from sambay.eval import reasoning
from sambay.eval.reasoning import Problem, ReasoningRun, evaluate, extract_letter, grade, last_boxed, load_problems
from sambay.eval.results import ResultsFile
from sambay.generate import SamplingParams
from tests.eval.conftest import held_out_math, write_jsonl

math_verify = pytest.importorskip("math_verify")


def test_last_boxed_balances_braces():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed {x^{2}}") == "x^{2}"
    assert last_boxed("no box here") is None
    assert last_boxed(r"\boxed{unclosed") is None


def test_grading_reads_only_the_answer_after_think():
    assert grade("math", "402", "<think>\nmaybe \\boxed{401}\n</think>\nThe answer is \\boxed{402}.") == ("402", True)
    assert grade("math", "402", "<think>\n... so it is \\boxed{402}") == (None, False)  # never closed its reasoning
    assert grade("math", r"\frac{1}{2}", "<think>x</think>\n\\boxed{0.5}")[1]  # Math-Verify: equal values
    assert grade("math", "402", "<think>x</think>\n402") == ("402", True)  # no box: Math-Verify finds the number
    assert grade("math", "13", "<think>x</think>\n\\boxed{31}") == ("31", False)


def test_gpqa_letters():
    assert extract_letter(r"I pick \boxed{C}") == "C"
    assert extract_letter(r"\boxed{(B)}") == "B"
    assert extract_letter(r"\boxed{\text{D}}") == "D"
    assert extract_letter("Answer: a") == "A"
    assert extract_letter(r"\boxed{42}") is None
    assert grade("gpqa", "B", "<think>hmm</think>\n\\boxed{B}") == ("B", True)


def test_gpqa_options_are_shuffled_with_a_fixed_seed(tmp_path):
    rows = [{"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(12)]
    path = write_jsonl(tmp_path / "gpqa.jsonl", rows)
    problems = load_problems(path, "gpqa", seed=0)
    assert problems == load_problems(path, "gpqa", seed=0)
    assert [p.answer for p in problems] != [p.answer for p in load_problems(path, "gpqa", seed=1)]
    assert len({p.answer for p in problems}) > 1  # the correct option moves around
    for p in problems:
        assert f"{p.answer}) right" in p.question and p.question.startswith(f"Q{p.index}?\n\nA) ")
    prompt = reasoning.render_prompt(reasoning.PROMPTS["gpqa"], problems[0])
    assert prompt.startswith("Please reason step by step, and put your final choice of one letter from A/B/C/D "
                             "within \\boxed{}. Q0?\n\nA) ")


def test_missing_fields_are_named_with_their_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1", "answer": "2"}, {"question": "x"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*problem, answer"):
        load_problems(path, "math")


def test_embedded_model_on_held_out_arithmetic(tmp_path, tokenizer, capsys):
    """The CLI end to end: the embedded model (no --model) samples 2 answers per problem, graded by Math-Verify."""
    data = write_jsonl(tmp_path / "arith.jsonl", held_out_math(tokenizer, 6))
    out = tmp_path / "results.jsonl"
    code = sambay_main(["eval", "reasoning", "--data", str(data), "--prompt", "{problem}", "--n", "2",
                        "--max-new-tokens", "100", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 6 and summary["samples"] == 12
    assert set(summary["pass_at_k"]) == {"1", "2"}
    assert summary["pass_at_1"] >= 0.75, summary  # 98.8% greedy on the held-out split; sampled at T = 0.6 here
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["header"]["prompt"] == "{problem}"
    samples = records[1:]
    assert sorted((r["problem"], r["sample"]) for r in samples) == [(p, j) for p in range(6) for j in range(2)]
    for r in samples:
        assert "</think>" in r["text"] and r["finish_reason"] == "stop"
        assert r["correct"] == (r["extracted"] == r["reference"])  # integers: verified equal iff the same digits


def test_resume_skips_finished_samples(tmp_path, engine, tokenizer):
    data = write_jsonl(tmp_path / "arith.jsonl", held_out_math(tokenizer, 3))
    problems = load_problems(data, "math")
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=100, seed=5)
    run = ReasoningRun("math", "{problem}", params, samples=3, slots=4)
    header = reasoning.results_header("math", "{problem}", params, data, "embedded")
    path = tmp_path / "results.jsonl"

    class Interrupted(Exception):
        pass

    first: list[dict] = []

    def stop_after_four(record: dict) -> None:
        first.append(record)
        if len(first) == 4:
            raise Interrupted

    with pytest.raises(Interrupted), ResultsFile(path, header, ("problem", "sample")) as results:
        evaluate(engine, problems, run, results, results.open(), stop_after_four)
    second: list[dict] = []
    with ResultsFile(path, header, ("problem", "sample")) as results:
        summary = evaluate(engine, problems, run, results, results.open(), second.append)
    finished = {(r["problem"], r["sample"]) for r in first}
    assert len(finished) == 4 and len(second) == 9 - 4
    assert finished.isdisjoint((r["problem"], r["sample"]) for r in second)
    assert summary["samples"] == 9 and summary["problems"] == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 + 9 and lines[1:5] == first  # the first run's records are kept as written
    for r in first + second:
        assert r["seed"] == 5 + reasoning.SEED_STRIDE * r["problem"] + r["sample"]


def test_render_prompt_keeps_other_braces():
    problem = Problem(0, "What is 1+1?", "2")
    assert reasoning.render_prompt(reasoning.PROMPTS["math"], problem) == (
        "Please reason step by step, and put your final answer within \\boxed{}. What is 1+1?")
