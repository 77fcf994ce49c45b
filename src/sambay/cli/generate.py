"""`sambay generate`: answer one prompt (through the chat template) or continue raw text.

    sambay generate --model DIR "What is 2 + 2?"            reasoning (dim on a terminal), then the answer
    sambay generate --model DIR --raw "Once upon a time"     plain continuation, no chat template
    sambay generate --model DIR --json --n 2 "..."           one JSON object: texts, token counts, timing
    echo "What is 2 + 2?" | sambay generate                  the prompt from stdin (also: "-", --prompt-file)

A prompt read from stdin or a file loses its trailing newlines, as the shell's $(cat FILE) does.

Tensor parallelism over N processes (one per GPU, NCCL; or gloo on the CPU), rank 0 prints:

    python -m torch.distributed.run --nproc-per-node 2 -m sambay.cli generate --tensor-parallel 2 --model DIR "..."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from sambay.cli._common import (
    ModelOptions,
    StreamTimer,
    UsageError,
    add_model_arguments,
    add_sampling_arguments,
    add_threads_argument,
    load_engine,
    model_options,
    prompt_ids,
    sampling_params,
    set_threads,
)
from sambay.cli._lora import add_lora_argument, apply_lora, read_lora
from sambay.cli._output import ReplyPrinter, make_console
from sambay.cli._structured import add_structured_arguments, structured_fields
from sambay.generate import Engine, SamplingParams, SequenceDelta
from sambay.lora import Adapter
from sambay.text.reasoning import ReasoningSplit, split_reasoning

HELP = "complete one prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the user message (with --raw: the text to continue); '-' or "
                        "none with stdin piped: read it from stdin")
    parser.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file ('-': stdin)")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    parser.add_argument("--system", metavar="TEXT", help="a system message (chat template only)")
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                        help="number of samples, sharing one prefill (default: 1; under torchrun, whose own "
                        "parser claims --n, spell it --num-samples)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating past the end-of-text tokens, up to --max-new-tokens (benchmarks)")
    parser.add_argument("--tensor-parallel", type=int, metavar="N", help="shard the model over N processes "
                        "started by torchrun (python -m torch.distributed.run --nproc-per-node N -m sambay.cli ...)")
    add_model_arguments(parser)
    add_lora_argument(parser)
    add_threads_argument(parser)
    add_sampling_arguments(parser)
    add_structured_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = model_options(args)
    params = sampling_params(args, n=args.n, **({"stop_token_ids": ()} if args.ignore_eos else {}),
                             **structured_fields(args, chat=not args.raw))
    if args.raw and args.system:
        raise UsageError("--system needs the chat template; drop --raw")
    prompt = _read_prompt(args)  # before loading, which takes seconds
    adapter = read_lora(args)
    if args.tensor_parallel is None:
        started = time.perf_counter()
        engine = load_engine(options, make_console(stderr=True))
        apply_lora(engine, adapter)
        set_threads(args.threads, engine.model)
        return _generate(args, engine, params, prompt, time.perf_counter() - started)
    return _generate_tensor_parallel(args, options, params, prompt, adapter)


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the argument; or stdin for ``-``, for --prompt-file -, or when no prompt is given and stdin
    is not a terminal; or the file of --prompt-file."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give the prompt as an argument or with --prompt-file, not both")
    if args.prompt_file is None and args.prompt not in (None, "-"):
        return args.prompt
    if args.prompt is None and args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError("no prompt: give it as an argument, with --prompt-file PATH, or on stdin")
    source = args.prompt_file or "-"
    if source == "-" and args.tensor_parallel is not None:  # the ranks would race for one stdin
        raise UsageError("--tensor-parallel: every process reads the prompt; give it as an argument or a file")
    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    text = text.rstrip("\r\n")
    if not text.strip():
        raise UsageError(f"the prompt from {'stdin' if source == '-' else source} is empty")
    return text


def _generate_tensor_parallel(args: argparse.Namespace, options: ModelOptions, params: SamplingParams,
                              prompt: str, adapter: Adapter | None) -> int:
    """Every rank loads the model, keeps its shard and steps in lockstep; rank 0 prints."""
    from sambay import parallel  # torch.distributed only where it is asked for

    if args.tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    with parallel.torchrun_group(args.tensor_parallel, options.device) as member:
        started = time.perf_counter()
        # CUDA-graph capture of the all-reduces is untested: decode runs eagerly
        engine = load_engine(replace(options, device=member.device), make_console(stderr=True), cuda_graphs=False)
        apply_lora(engine, adapter)  # into the full weights, before they are sharded
        set_threads(args.threads, engine.model)
        parallel.tensor_parallel(engine.model)
        if params.seed is None:
            parallel.agree_on_rng(member.device)  # same logits and same noise: the same tokens on every rank
        load_s = time.perf_counter() - started
        if member.rank == 0:
            return _generate(args, engine, params, prompt, load_s)
        for _ in engine.stream([_prompt_ids(args, prompt, engine)], params):
            pass
        return 0


def _prompt_ids(args: argparse.Namespace, prompt: str, engine: Engine) -> list[int]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return prompt_ids(engine, prompt if args.raw else [*messages, {"role": "user", "content": prompt}])


def _generate(args: argparse.Namespace, engine: Engine, params: SamplingParams, prompt: str, load_s: float) -> int:
    """Stream the completion of the prompt and print it (text, samples or one JSON object)."""
    ids = _prompt_ids(args, prompt, engine)
    timer = StreamTimer(prompt_tokens=len(ids))
    stream = timer.run(engine.stream([ids], params))
    if args.json:
        texts, counts, reasons, reasoning = _collect(stream, params.n)
        choices = [{**_choice(j, texts[j], counts[j], reasons[j], raw=args.raw), "reasoning_tokens": reasoning[j]}
                   for j in range(params.n)]
        timing = {"load_s": round(load_s, 4), **timer.as_dict()}
        print(json.dumps({"prompt_tokens": len(ids), "completion_tokens": sum(counts), "choices": choices,
                          "timing": timing}, ensure_ascii=False))
    elif params.n == 1:
        printer = ReplyPrinter(make_console(), parse_reasoning=not args.raw)
        for step in stream:
            printer.feed("".join(d.text for d in step))
        printer.finish()
    else:
        _print_samples(_collect(stream, params.n)[0], raw=args.raw)
    return 0


def _collect(stream: Iterator[list[SequenceDelta]], n: int
             ) -> tuple[list[str], list[int], list[str | None], list[int]]:
    """Texts, generated-token counts, finish reasons and reasoning tokens of the n samples of one prompt."""
    texts, counts, reasons, reasoning = [""] * n, [0] * n, [None] * n, [0] * n
    for step in stream:
        for d in step:
            texts[d.sample_index] += d.text
            counts[d.sample_index] += 1
            reasons[d.sample_index] = d.finish_reason
            reasoning[d.sample_index] = d.reasoning_tokens or reasoning[d.sample_index]
    return texts, counts, reasons, reasoning


def _choice(index: int, text: str, tokens: int, finish_reason: str | None, *, raw: bool) -> dict:
    split = ReasoningSplit(content=text) if raw else split_reasoning(text)
    return {"index": index, "reasoning": split.reasoning, "content": split.content, "completion_tokens": tokens,
            "finish_reason": finish_reason}


def _print_samples(texts: list[str], *, raw: bool) -> None:
    console = make_console()
    for j, text in enumerate(texts):
        console.rule(f"sample {j + 1} of {len(texts)}")
        printer = ReplyPrinter(console, parse_reasoning=not raw)
        printer.feed(text)
        printer.finish()
