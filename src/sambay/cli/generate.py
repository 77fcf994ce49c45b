"""`sambay generate`: answer one prompt (through the chat template) or continue raw text.

    sambay generate --model DIR "What is 2 + 2?"            reasoning (dim on a terminal), then the answer
    sambay generate --model DIR --raw "Once upon a time"     plain continuation, no chat template
    sambay generate --model DIR --json --n 2 "..."           one JSON object: texts, token counts, timing

Tensor parallelism over N processes (one per GPU, NCCL; or gloo on the CPU), rank 0 prints:

    python -m torch.distributed.run --nproc-per-node 2 -m sambay.cli generate --tensor-parallel 2 --model DIR "..."
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import replace

from sambay.cli._common import (
    ModelOptions,
    StreamTimer,
    UsageError,
    add_model_arguments,
    add_sampling_arguments,
    load_engine,
    model_options,
    prompt_ids,
    sampling_params,
)
from sambay.cli._output import ReplyPrinter, make_console
from sambay.generate import Engine, SamplingParams, SequenceDelta
from sambay.text.reasoning import ReasoningSplit, split_reasoning

HELP = "complete one prompt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (with --raw: the text to continue)")
    parser.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    parser.add_argument("--system", metavar="TEXT", help="a system message (chat template only)")
    parser.add_argument("--n", "--num-samples", dest="n", type=int, default=1,
                        help="number of samples, sharing one prefill (default: 1; under torchrun, whose own "
                        "parser claims --n, spell it --num-samples)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--tensor-parallel", type=int, metavar="N", help="shard the model over N processes "
                        "started by torchrun (python -m torch.distributed.run --nproc-per-node N -m sambay.cli ...)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)


def main(args: argparse.Namespace) -> int:
    options = model_options(args)
    params = sampling_params(args, n=args.n)
    if args.raw and args.system:
        raise UsageError("--system needs the chat template; drop --raw")
    if args.tensor_parallel is None:
        started = time.perf_counter()
        engine = load_engine(options, make_console(stderr=True))
        return _generate(args, engine, params, time.perf_counter() - started)
    return _generate_tensor_parallel(args, options, params)


def _generate_tensor_parallel(args: argparse.Namespace, options: ModelOptions, params: SamplingParams) -> int:
    """Every rank loads the model, keeps its shard and steps in lockstep; rank 0 prints."""
    from sambay import parallel  # torch.distributed only where it is asked for

    if args.tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    with parallel.torchrun_group(args.tensor_parallel, options.device) as member:
        started = time.perf_counter()
        # CUDA-graph capture of the all-reduces is untested: decode runs eagerly
        engine = load_engine(replace(options, device=member.device), make_console(stderr=True), cuda_graphs=False)
        parallel.tensor_parallel(engine.model)
        if params.seed is None:
            parallel.agree_on_rng(member.device)  # same logits and same noise: the same tokens on every rank
        load_s = time.perf_counter() - started
        if member.rank == 0:
            return _generate(args, engine, params, load_s)
        for _ in engine.stream([_prompt_ids(args, engine)], params):
            pass
        return 0


def _prompt_ids(args: argparse.Namespace, engine: Engine) -> list[int]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return prompt_ids(engine, args.prompt if args.raw else [*messages, {"role": "user", "content": args.prompt}])


def _generate(args: argparse.Namespace, engine: Engine, params: SamplingParams, load_s: float) -> int:
    """Stream the completion of the prompt and print it (text, samples or one JSON object)."""
    ids = _prompt_ids(args, engine)
    timer = StreamTimer()
    stream = timer.run(engine.stream([ids], params))
    if args.json:
        texts, counts, reasons = _collect(stream, params.n)
        choices = [_choice(j, texts[j], counts[j], reasons[j], raw=args.raw) for j in range(params.n)]
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


def _collect(stream: Iterator[list[SequenceDelta]], n: int) -> tuple[list[str], list[int], list[str | None]]:
    """Texts, generated-token counts and finish reasons of the n samples of one prompt."""
    texts, counts, reasons = [""] * n, [0] * n, [None] * n
    for step in stream:
        for d in step:
            texts[d.sample_index] += d.text
            counts[d.sample_index] += 1
            reasons[d.sample_index] = d.finish_reason
    return texts, counts, reasons


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
