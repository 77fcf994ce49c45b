"""Reasoning-budget and structured-output flags, shared by the generation subcommands (generate, chat, eval).

    --max-reasoning-tokens N   close the <think> block after N tokens (0: no reasoning)
    --json-schema FILE         the answer is JSON that validates against the schema in FILE
    --choice a,b,c             the answer is exactly one of these strings
    --regex PATTERN            the answer matches the regular expression

`add_reasoning_argument` / `reasoning_fields` are the budget alone (for `sambay eval`, whose answers are
graded as written); `add_structured_arguments` / `structured_fields` add the grammars. The fields go into
`SamplingParams` (``sampling_params(args, **fields)`` in `sambay.cli._common`); a grammar's own errors (an
invalid schema) surface when the engine first compiles it, as ValueErrors with the reason.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sambay.cli._common import UsageError
from sambay.generate.guided import GuidedDecoding


def add_reasoning_argument(parser: argparse.ArgumentParser) -> None:
    """--max-reasoning-tokens N."""
    parser.add_argument("--max-reasoning-tokens", type=int, metavar="N",
                        help="close the model's <think> block after N tokens and let it answer (0: skip the "
                        "reasoning; default: no bound). Chat prompts only")


def reasoning_fields(args: argparse.Namespace, *, chat: bool) -> dict:
    """The `SamplingParams` fields of the budget: ``chat`` prompts are reasoning requests (their reply opens
    the <think> block); a budget with a raw prompt is a UsageError."""
    budget = args.max_reasoning_tokens
    if budget is not None and budget < 0:
        raise UsageError(f"--max-reasoning-tokens must be >= 0, got {budget}")
    if budget is not None and not chat:
        raise UsageError("--max-reasoning-tokens bounds the reasoning of a chat prompt; drop --raw")
    return {"reasoning": chat, "max_reasoning_tokens": budget}


def add_structured_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-reasoning-tokens, and --json-schema FILE | --choice a,b,c | --regex PATTERN."""
    group = parser.add_argument_group("reasoning and structured output (the grammar applies after </think>; "
                                      "needs the grammar extra)")
    add_reasoning_argument(group)
    grammar = group.add_mutually_exclusive_group()
    grammar.add_argument("--json-schema", metavar="FILE", help="the answer is JSON valid against this JSON Schema")
    grammar.add_argument("--choice", metavar="A,B,C", help="the answer is exactly one of these comma-separated strings")
    grammar.add_argument("--regex", metavar="PATTERN", help="the answer matches this regular expression")


def structured_fields(args: argparse.Namespace, *, chat: bool) -> dict:
    """`SamplingParams` fields of the budget and the grammar flags; unreadable ones are a UsageError."""
    fields = reasoning_fields(args, chat=chat)
    try:
        if args.json_schema is not None:
            fields["guided"] = GuidedDecoding.from_schema(json.loads(Path(args.json_schema).read_text("utf-8")))
        elif args.choice is not None:
            fields["guided"] = GuidedDecoding(choice=tuple(c for c in args.choice.split(",") if c))
        elif args.regex is not None:
            fields["guided"] = GuidedDecoding(regex=args.regex)
    except OSError as e:
        raise UsageError(f"--json-schema: cannot read {args.json_schema}: {e.strerror}") from None
    except ValueError as e:  # a JSONDecodeError, or a GuidedDecoding refusal
        flag = "--json-schema" if args.json_schema is not None else "--choice" if args.choice else "--regex"
        raise UsageError(f"{flag}: {e}") from None
    return fields
