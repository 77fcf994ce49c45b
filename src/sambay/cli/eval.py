"""`sambay eval`: the paper's reasoning protocol, long-context retrieval, and perplexity.

    sambay eval reasoning --model DIR --data aime24.jsonl --n 64 --out aime24.results.jsonl
    sambay eval reasoning --model DIR --data gpqa_diamond.jsonl --task gpqa --n 8 --json
    sambay eval phonebook --model DIR --lengths 1K,2K,4K,8K --samples 20 --plot phonebook.png
    sambay eval niah --model DIR --kind single --kind multikey --plot niah.png
    sambay eval perplexity --model DIR --data text.jsonl --window 4096
    sambay eval phonebook --model DIR --write-data phonebook-train.jsonl --count 20000 --lengths 256,512,1K

Reasoning data is JSONL in the public sets' field names: AIME and MATH-500 ``problem``/``answer``; GPQA
``Question``/``Correct Answer``/``Incorrect Answer 1``-``3``. Defaults are the paper's protocol (prompt,
temperature 0.6, top-p 0.95, 32,768 new tokens; n = 64 as for AIME, the paper used 8 for MATH-500 and GPQA).
With ``--out`` every sample is written as it finishes and a rerun resumes where the last one stopped.
The retrieval tests are generated locally and seeded (`sambay.eval.retrieval`); ``--write-data`` writes
such documents as training JSONL for `sambay train` instead of evaluating. lm-evaluation-harness runs
through its own command line: ``lm_eval --model sambay --model_args path=DIR --tasks ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sambay.cli._common import (
    UsageError,
    add_model_arguments,
    add_sampling_arguments,
    add_threads_argument,
    load_engine,
    model_options,
    sampling_params,
    set_threads,
)
from sambay.cli._output import make_console

HELP = "evaluate a model: reasoning (pass@k), phonebook / NIAH retrieval, perplexity"
RETRIEVAL_LENGTHS = tuple(1024 * 2**i for i in range(8))  # 1K ... 128K, cut to what the model allows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="eval_task", metavar="TASK", required=True)
    for name, add, help_ in (("reasoning", _add_reasoning, "pass@k of sampled answers graded by Math-Verify"),
                             ("phonebook", _add_phonebook, "phone-number retrieval against context length"),
                             ("niah", _add_niah, "needle-in-a-haystack (RULER) against context length"),
                             ("perplexity", _add_perplexity, "loss, perplexity and bits per byte of text")):
        sub = tasks.add_parser(name, help=help_, description=help_)
        add(sub)
        add_model_arguments(sub)
        add_threads_argument(sub)
        sub.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        sub.set_defaults(parser=sub)


def _add_reasoning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="FILE", help="problems, JSONL (field names: see sambay eval -h)")
    p.add_argument("--task", choices=("math", "gpqa"), default="math", help="answer format (default: math)")
    p.add_argument("--n", type=_positive, default=64, help="samples per problem (default: 64)")
    p.add_argument("--prompt", metavar="TEMPLATE", help="user message with a {problem} placeholder (default: the "
                   "paper's instruction, then the problem)")
    p.add_argument("--out", metavar="FILE", help="results JSONL, written as samples finish; resumed if it exists")
    p.add_argument("--batch-size", type=_positive, metavar="N",
                   help="sequences generated at once (default: 64 on a GPU, 8 on a CPU)")
    add_sampling_arguments(p)


def _add_retrieval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", metavar="LIST", help="context lengths in tokens, e.g. 1K,2K,4096 (default: 1K, 2K, "
                   "4K, ... 128K, as far as the model's max_seq_len allows)")
    p.add_argument("--samples", type=_positive, default=20, help="prompts per length, needle depths spread over the "
                   "context (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens generated per answer (default: 32)")
    p.add_argument("--batch-size", type=_positive, metavar="N", help="prompts generated at once (default: 8)")
    p.add_argument("--out", metavar="FILE", help="results JSONL, written as prompts finish; resumed if it exists")
    p.add_argument("--plot", metavar="FILE", help="write accuracy against context length here (needs matplotlib)")
    p.add_argument("--write-data", metavar="FILE", help="write --count generated documents (prompt and answer) as "
                   "training JSONL instead of evaluating; only the tokenizer is loaded")
    p.add_argument("--count", type=_positive, default=10000, help="documents for --write-data (default: 10000)")


def _add_phonebook(p: argparse.ArgumentParser) -> None:
    _add_retrieval(p)
    p.add_argument("--queries", type=_non_negative, default=0, metavar="N",
                   help="with --write-data: N more lookups after each document's answer, other lines of its book, "
                   "so one book trains N + 3 retrievals (default: 0)")


def _add_niah(p: argparse.ArgumentParser) -> None:
    _add_retrieval(p)
    p.add_argument("--kind", action="append", choices=("single", "multikey"),
                   help="single needle, or several keys with distractors (repeatable; default: both)")
    p.add_argument("--keys", type=_positive, default=4, help="needles of a multikey prompt (default: 4)")


def _add_perplexity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help=".txt (one document) or .jsonl "
                   "({\"text\": ...} per line)")
    p.add_argument("--window", type=_positive,
                   help="tokens per window (default: 4096, at most the model's max_seq_len)")
    p.add_argument("--stride", type=_positive, help="tokens between window starts (default: window // 2)")
    p.add_argument("--batch-tokens", type=_positive, default=16384, help="tokens per forward (default: 16384)")


def main(args: argparse.Namespace) -> int:
    return {"reasoning": _reasoning, "phonebook": _retrieval, "niah": _retrieval,
            "perplexity": _perplexity}[args.eval_task](args)


def _reasoning(args: argparse.Namespace) -> int:
    from sambay.eval import reasoning
    from sambay.eval.report import EvalProgress, reasoning_table
    from sambay.eval.results import ResultsFile

    if args.prompt is not None and "{problem}" not in args.prompt:
        raise UsageError("--prompt needs a {problem} placeholder")
    params = sampling_params(args)
    problems = reasoning.load_problems(args.data, args.task, params.seed or 0)  # before loading the model
    if args.task == "math":
        reasoning.require_grader()
    template = args.prompt or reasoning.PROMPTS[args.task]
    header = reasoning.results_header(args.task, template, params, Path(args.data), str(model_options(args).model_dir))
    with ResultsFile(args.out, header, ("problem", "sample")) as results:
        done = results.open()  # a file of another run is refused before the model loads
        engine, err = _load(args)
        if args.out is None:
            err.print("no --out: samples are not saved, and an interrupted run starts over")
        run = reasoning.ReasoningRun(args.task, template, params, args.n, _batch_size(args, engine, gpu=64, cpu=8))
        left = {p.index: sum((p.index, j) not in done for j in range(args.n)) for p in problems}
        with EvalProgress(err, sum(left.values()), "samples") as bar:
            def on_record(record: dict) -> None:
                left[record["problem"]] -= 1
                bar.advance(status=f"{sum(v == 0 for v in left.values())}/{len(left)} problems")

            summary = reasoning.evaluate(engine, problems, run, results, done, on_record, bar.add_tokens)
    if args.json:
        print(json.dumps(summary))
    else:
        make_console().print(reasoning_table(summary, f"{args.task}: {Path(args.data).name}, n = {args.n}"))
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    from sambay.eval.report import retrieval_table
    from sambay.eval.retrieval import accuracy_by_length, require_faker

    kinds = args.kind or ("single", "multikey") if args.eval_task == "niah" else ()
    tasks = [f"niah_{k}" for k in dict.fromkeys(kinds)] or ["phonebook"]
    if args.write_data:
        return _write_data(args, tasks)
    if args.lengths is not None:
        _lengths(args.lengths, None)  # a typo is reported before the model loads
    require_faker()
    records, lengths = _run_retrieval(args, tasks)
    by_task = {t: accuracy_by_length([r for r in records if r["task"] == t and r["length"] in lengths]) for t in tasks}
    if args.plot:
        from sambay.eval.plot import plot_accuracy

        curves = {t: {n: row["accuracy"] for n, row in rows.items()} for t, rows in by_task.items()}
        plot_accuracy(curves, args.plot, f"{args.eval_task}: {model_options(args).model_dir.name}")
    if args.json:
        print(json.dumps({t: {str(n): row for n, row in rows.items()} for t, rows in by_task.items()}))
    else:
        make_console().print(retrieval_table(by_task, f"{args.eval_task} accuracy, seed {args.seed}"))
    return 0


def _run_retrieval(args: argparse.Namespace, tasks: list[str]) -> tuple[list[dict], list[int]]:
    """Generate the prompts, answer those not in --out, and return every record with the lengths asked for."""
    from sambay.eval import retrieval
    from sambay.eval.report import EvalProgress
    from sambay.eval.results import ResultsFile

    keys = getattr(args, "keys", 4)
    header = {"tasks": tasks, "model": str(model_options(args).model_dir), "seed": args.seed,
              "keys": keys if args.eval_task == "niah" else None, "faker": _faker_version()}
    with ResultsFile(args.out, header, ("task", "length", "index")) as results:
        done = results.open()  # a file of another run is refused before the model loads
        engine, err = _load(args)
        lengths = _lengths(args.lengths, engine.model.config.max_seq_len - args.max_new_tokens)
        with err.status("generating prompts"):
            samples = [s for t in tasks for s in retrieval.make_samples(t, engine.tokenizer, lengths, args.samples,
                                                                         args.seed, keys)]
        samples = [s for s in samples if (s.task, s.length, s.index) not in done]
        with EvalProgress(err, len(samples), "prompts") as bar:
            def on_record(record: dict) -> None:
                results.append(record)
                done[results.key(record)] = record
                bar.advance()

            retrieval.evaluate(engine, samples, max_new_tokens=args.max_new_tokens, on_record=on_record,
                               slots=_batch_size(args, engine, gpu=8, cpu=8), on_step=bar.add_tokens)
    return list(done.values()), lengths


def _write_data(args: argparse.Namespace, tasks: list[str]) -> int:
    from sambay.eval.retrieval import training_documents
    from sambay.tokenizer import load_tokenizer

    if args.lengths is None:
        raise UsageError("--write-data needs --lengths (keep them well under the trainer's seq_len)")
    tokenizer = load_tokenizer(model_options(args).tokenizer_dir)
    lengths = _lengths(args.lengths, None)
    Path(args.write_data).parent.mkdir(parents=True, exist_ok=True)
    with open(args.write_data, "w", encoding="utf-8") as f:
        for i, task in enumerate(tasks):
            count = args.count // len(tasks) + (i < args.count % len(tasks))
            for text in training_documents(task, tokenizer, lengths, count, args.seed, getattr(args, "keys", 4),
                                           getattr(args, "queries", 0)):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    print(json.dumps({"wrote": args.write_data, "documents": args.count, "tasks": tasks, "lengths": lengths}))
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from sambay.eval.perplexity import perplexity, read_documents
    from sambay.eval.report import EvalProgress, perplexity_table

    documents = [doc for path in args.data for doc in read_documents(path)]  # before loading the model
    engine, err = _load(args)
    window = args.window or min(4096, engine.model.config.max_seq_len)
    bar = EvalProgress(err, 0, "windows")
    with bar:
        result = perplexity(engine.model, engine.tokenizer, documents, window=window, stride=args.stride,
                            batch_tokens=args.batch_tokens, on_windows=bar.set_total,
                            on_batch=bar.advance)
    if args.json:
        print(json.dumps(result))
    else:
        make_console().print(perplexity_table(result, f"perplexity: {', '.join(Path(p).name for p in args.data)}"))
    return 0


def _load(args: argparse.Namespace):
    err = make_console(stderr=True)
    engine = load_engine(model_options(args), err)
    set_threads(args.threads, engine.model)
    return engine, err


def _batch_size(args: argparse.Namespace, engine, *, gpu: int, cpu: int) -> int:
    return args.batch_size or (gpu if engine.model.device.type == "cuda" else cpu)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _lengths(text: str | None, limit: int | None) -> list[int]:
    """``1K,2K,4096`` → [1024, 2048, 4096]; the default: 1K … 128K up to ``limit``."""
    if text is None:
        lengths = [n for n in RETRIEVAL_LENGTHS if n <= limit]
        if not lengths:
            raise UsageError(f"the model's max_seq_len leaves room for {limit} prompt tokens: give --lengths")
        return lengths
    try:
        lengths = sorted({int(float(t[:-1]) * 1024) if t[-1:] in "kK" else int(t) for t in text.split(",") if t})
    except ValueError:
        raise UsageError(f"--lengths: expected numbers like 1K,2K,4096, got {text!r}") from None
    if not lengths or lengths[0] < 64:
        raise UsageError("--lengths: each context length must be >= 64 tokens")
    if limit is not None and lengths[-1] > limit:
        raise UsageError(f"--lengths: {lengths[-1]} tokens plus --max-new-tokens exceed the model's max_seq_len")
    return lengths


def _faker_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faker")
    except PackageNotFoundError:
        return None

