"""The paper's reasoning protocol: prompts, sampling, answer extraction, Math-Verify grading and pass@k.

Phi-4-mini-flash-reasoning was scored (SambaY paper, appendix G; the model card) on AIME24/25, MATH-500
and GPQA-Diamond with pass@1 averaged over 64 samples (AIME) or 8 (MATH-500, GPQA) at temperature 0.6,
top-p 0.95 and up to 32,768 generated tokens, graded with Math-Verify. The prompts are those of the
authors' evaluation code (microsoft/ArchScale, ``eval_reason/eval_reason.py``), sent as one user message
through the chat template. There the instruction comes *before* the problem, so it does here too:

    math  "Please reason step by step, and put your final answer within \\boxed{}. {problem}"
    gpqa  "Please reason step by step, and put your final choice of one letter from A/B/C/D within \\boxed{}.
           {problem}"   where {problem} is the question, a blank line, and "A) …\\nB) …\\nC) …\\nD) …"

Data (JSONL, one problem per line; the files come from the user, sambay never touches a hub):
    AIME 2024/2025, MATH-500   ``problem``, ``answer``
    GPQA(-Diamond)             ``Question``, ``Correct Answer``, ``Incorrect Answer 1`` .. ``3``; the four
                               options are shuffled with a generator seeded by (seed, problem index).

Scoring: the answer is the text after ``</think>`` (`sambay.text.reasoning.split_reasoning`; a sample that
never closes its reasoning has no answer). Math: the last ``\\boxed{…}`` in it, compared with the reference
by `math_verify.verify` (with no box, Math-Verify extracts an expression from the whole answer). GPQA: the
letter in the last box (or after "Answer:"), compared with the shuffled position of the correct option.
pass@1 is the mean correctness over all samples of a problem, averaged over problems, and pass@k the
unbiased estimator of Chen et al. 2021 (Codex, eq. 1): ``1 - C(n - c, k) / C(n, k)`` for c correct of n.

Sample j of problem i is seeded ``seed + SEED_STRIDE * i + j``, whatever else runs beside it, so a resumed
run draws the same noise for the samples it still needs, and a larger ``n`` extends a run.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sambay.eval.batching import Finished, Job, run_jobs
from sambay.eval.results import ResultsFile
from sambay.generate import Engine, SamplingParams
from sambay.text.reasoning import split_reasoning

TASKS = ("math", "gpqa")
PROMPTS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}. {problem}",
    "gpqa": "Please reason step by step, and put your final choice of one letter from A/B/C/D within \\boxed{}. "
            "{problem}",
}
FIELDS = {
    "math": ("problem", "answer"),
    "gpqa": ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
}
LETTERS = "ABCD"
SEED_STRIDE = 1_000_003  # sample seeds of consecutive problems never meet (n < SEED_STRIDE)


@dataclass(frozen=True)
class Problem:
    """One problem: the text that fills ``{problem}`` and the reference answer (a letter for GPQA)."""

    index: int
    question: str
    answer: str


def load_problems(path: str | Path, task: str, seed: int = 0) -> list[Problem]:
    """Problems of a JSONL file in the public sets' field names (module docstring).

    Raises:
        ValueError: an unknown task, a line that is not a JSON object, or a missing field (named, with its line).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
            missing = [name for name in FIELDS[task] if not isinstance(record, dict) or name not in record]
            if missing:
                raise ValueError(f"{path}:{number}: a {task} problem needs the field(s) {', '.join(missing)}")
            index = len(problems)
            if task == "math":
                problems.append(Problem(index, str(record["problem"]), str(record["answer"])))
            else:
                problems.append(_gpqa_problem(index, record, seed))
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def _gpqa_problem(index: int, record: Mapping[str, Any], seed: int) -> Problem:
    """The question with its options shuffled by a generator of (seed, index), as in the authors' code."""
    options = [str(record[f"Incorrect Answer {k}"]).strip() for k in (1, 2, 3)]
    gold = random.Random(f"gpqa:{seed}:{index}").randint(0, 3)
    options.insert(gold, str(record["Correct Answer"]).strip())
    listing = "\n".join(f"{letter}) {option}" for letter, option in zip(LETTERS, options, strict=True))
    return Problem(index, f"{str(record['Question']).strip()}\n\n{listing}", LETTERS[gold])


def render_prompt(template: str, problem: Problem) -> str:
    """The user message: ``template`` with ``{problem}`` replaced (other braces are kept as written)."""
    return template.replace("{problem}", problem.question)


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces balanced; None if none."""
    found = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i]
                break
    return found


def extract_letter(answer: str) -> str | None:
    """A GPQA choice: the letter in the last box (``A``, ``(A)``, ``\\text{A}``), else after the last "Answer:"."""
    boxed = last_boxed(answer)
    if boxed is not None:
        match = re.fullmatch(r"\s*(?:\\text\{)?\s*\(?([A-D])\)?\s*\}?\s*", boxed)
        return match.group(1) if match else None
    matches = re.findall(r"(?i)answer\s*:\s*\(?([A-D])\b", answer)
    return matches[-1].upper() if matches else None


def grade(task: str, reference: str, text: str) -> tuple[str | None, bool]:
    """Extract the answer of one completion and grade it.

    Args:
        task: "math" or "gpqa".
        reference: the problem's answer (math) or correct letter (gpqa).
        text: the whole completion, reasoning included.

    Returns:
        (the extracted answer or None, whether it is correct).
    """
    answer = split_reasoning(text).content  # "" when the reasoning never ended
    if task == "gpqa":
        letter = extract_letter(answer)
        return letter, letter == reference
    parse, verify = require_grader()
    boxed = last_boxed(answer)
    predicted = parse("\\boxed{" + boxed + "}") if boxed is not None else parse(answer) if answer.strip() else []
    gold = parse("$" + reference + "$") or parse(reference)
    extracted = boxed if boxed is not None else (str(predicted[-1]) if predicted else None)
    return extracted, bool(predicted and gold and verify(gold, predicted))


def require_grader():
    """Math-Verify's ``parse`` and ``verify``; RuntimeError with the install command when it is missing."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise RuntimeError("grading needs the math-verify package: pip install 'sambay[eval]'") from None
    return parse, verify


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct of ``n`` samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize(records: Sequence[Mapping[str, Any]], n: int) -> dict[str, Any]:
    """pass@1, pass@k for k = 1, 2, 4, … up to the fewest samples of a problem, and counts.

    Args:
        records: one per sample, with ``problem``, ``sample``, ``correct``, ``output_tokens``; samples with
            ``sample >= n`` are left out (a file that also holds a larger run).
        n: samples per problem.
    """
    by_problem: dict[int, list[bool]] = {}
    tokens = []
    for r in records:
        if r["sample"] < n:
            by_problem.setdefault(r["problem"], []).append(bool(r["correct"]))
            tokens.append(r["output_tokens"])
    if not by_problem:
        return {"pass_at_1": 0.0, "pass_at_k": {}, "problems": 0, "samples": 0, "mean_output_tokens": 0.0}
    fewest = min(len(v) for v in by_problem.values())
    ks = [2**i for i in range(int(math.log2(fewest)) + 1)]
    pass_k = {str(k): sum(pass_at_k(len(v), sum(v), k) for v in by_problem.values()) / len(by_problem) for k in ks}
    return {"pass_at_1": pass_k["1"], "pass_at_k": pass_k, "problems": len(by_problem), "samples": len(tokens),
            "mean_output_tokens": sum(tokens) / len(tokens),
            "truncated": sum(r.get("finish_reason") == "length" for r in records if r["sample"] < n)}


@dataclass(frozen=True)
class ReasoningRun:
    """What one `sambay eval reasoning` run asks for."""

    task: str
    template: str  # the user message, with a {problem} placeholder
    params: SamplingParams  # n is ignored: ``samples`` sets it; seed is the base seed (None: 0)
    samples: int  # per problem
    slots: int  # sequences decoded at once


def results_header(task: str, template: str, params: SamplingParams, data: Path, model: str) -> dict[str, Any]:
    """What a results file must agree on to be resumed: everything but the number of samples."""
    p = params
    sampling = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
                "frequency_penalty": p.frequency_penalty, "max_new_tokens": p.max_new_tokens,
                "seed": p.seed or 0, "stop": list(p.stop)}
    return {"task": task, "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "model": model,
            "prompt": template, "sampling": sampling}


def evaluate(engine: Engine, problems: Sequence[Problem], run: ReasoningRun, results: ResultsFile,
             done: dict[tuple, dict], on_record: Callable[[dict], None] | None = None,
             on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Sample, grade and record every (problem, sample) not yet in ``done``; return the summary.

    Args:
        engine: the model and tokenizer (with its chat template).
        problems: from `load_problems`.
        run: task, prompt, sampling, samples per problem, batch size.
        results: an opened results file; each record is appended to it as it finishes.
        done: the records already there (``results.open()``), by (problem, sample); new ones are added.
        on_record: called with each new record (progress).
        on_step: called with the tokens generated by each engine step (progress).

    Returns:
        `summarize` of every record of these problems, old and new.
    """
    if run.task == "math":
        require_grader()  # before any generation
    base = run.params.seed or 0
    jobs = []
    for problem in problems:
        message = {"role": "user", "content": render_prompt(run.template, problem)}
        prompt = engine.tokenizer.apply_chat_template([message])
        for j in range(run.samples):
            if (problem.index, j) not in done:
                seed = base + SEED_STRIDE * problem.index + j
                jobs.append(Job((problem.index, j, seed), prompt, run.params.replace(n=1, seed=seed)))

    def finish(seq: Finished) -> None:
        index, sample, seed = seq.key
        extracted, correct = grade(run.task, problems[index].answer, seq.text)
        record = {"problem": index, "sample": sample, "seed": seed, "correct": correct, "extracted": extracted,
                  "reference": problems[index].answer, "output_tokens": len(seq.token_ids),
                  "finish_reason": seq.finish_reason, "text": seq.text}
        results.append(record)
        done[(index, sample)] = record
        if on_record is not None:
            on_record(record)

    run_jobs(engine, jobs, finish, slots=run.slots, on_step=on_step)
    wanted = {p.index for p in problems}
    return summarize([r for r in done.values() if r["problem"] in wanted], run.samples)
