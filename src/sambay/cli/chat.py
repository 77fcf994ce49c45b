"""`sambay chat`: an interactive conversation with a model, in the terminal.

    sambay chat --model DIR [--system TEXT] [sampling flags]

Each reply streams as it is generated: the reasoning dimmed, then the answer, then the token count,
generation speed and prompt-processing speed. The history keeps the answers only (not the reasoning),
as reasoning-model servers send it back. Commands: `/reset` forgets the conversation, `/system <text>`
sets the system message (and resets), `/exit` (or Ctrl-D) quits. Ctrl-C stops the reply being generated
and drops that turn.

Every turn re-reads the whole conversation (the cache is not kept between turns). When it outgrows the
model's context, the oldest exchanges are dropped (the system message stays) and the chat says so; a
message too long to fit even alone is not sent, and the session goes on.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing
from dataclasses import dataclass, field

from rich.console import Console

from sambay.cli._common import (
    StreamTimer,
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
from sambay.cli._output import REASONING_STYLE, ReplyPrinter, make_console
from sambay.cli._structured import add_structured_arguments, structured_fields
from sambay.generate import Engine, SamplingParams

HELP = "chat with a model interactively"
COMMANDS_HELP = "commands: /reset, /system <text>, /exit (Ctrl-D); Ctrl-C stops a reply"


@dataclass
class Conversation:
    """The system message and the turns so far."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", metavar="TEXT", help="the system message")
    add_model_arguments(parser)
    add_lora_argument(parser)
    add_threads_argument(parser)
    add_sampling_arguments(parser)
    add_structured_arguments(parser)
    parser.add_argument("--prefix-cache-gb", "--prefix-cache-memory-gb", dest="prefix_cache_gb",
                        type=float, default=1.0, metavar="GB",
                        help="memory for the prefix cache's state snapshots, so each turn prefills only what is "
                             "new (default 1; 0 turns it off)")


def main(args: argparse.Namespace) -> int:
    options = model_options(args)
    params = sampling_params(args, **structured_fields(args, chat=True))
    console = make_console()
    adapter = read_lora(args)
    engine = load_engine(options, make_console(stderr=True))
    apply_lora(engine, adapter)
    engine.prefix_cache_bytes = max(0, int(args.prefix_cache_gb * 1e9))
    set_threads(args.threads, engine.model)
    console.print(COMMANDS_HELP, style=REASONING_STYLE)
    conversation = Conversation(system=args.system)
    while (line := _read_line(console)) is not None:
        if line.startswith("/"):
            if not _command(line, conversation, console):
                return 0
        elif line:
            _turn(engine, params, conversation, line, console)
    return 0


def _read_line(console: Console) -> str | None:
    """The next input line, stripped; None at end of input. Ctrl-C here only prints a hint."""
    while True:
        try:
            return input("> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            console.print()
            return None
        except KeyboardInterrupt:
            console.print("\n(/exit or Ctrl-D to quit)", style=REASONING_STYLE)


def _command(line: str, conversation: Conversation, console: Console) -> bool:
    """Run a /command; False means exit."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.turns.clear()
        console.print("(conversation reset)", style=REASONING_STYLE)
    elif name == "/system":
        conversation.system, conversation.turns = rest.strip() or None, []
        console.print(f"(system message {'set' if rest.strip() else 'cleared'}; conversation reset)",
                      style=REASONING_STYLE)
    else:
        console.print(f"unknown command {name}; {COMMANDS_HELP}", style=REASONING_STYLE)
    return True


def _fit_context(engine: Engine, params: SamplingParams, conversation: Conversation, console: Console
                 ) -> list[int] | None:
    """The conversation's prompt ids, its oldest exchanges dropped until the reply has room; None (and the
    message is not kept) when the newest message does not fit even alone."""
    max_len = engine.model.config.max_seq_len
    room = min(params.max_new_tokens, max_len // 4)  # for the reply: not all of max_new_tokens, which can be huge
    ids = prompt_ids(engine, conversation.messages())
    if len(ids) + room <= max_len:
        return ids
    alone = len(prompt_ids(engine, Conversation(conversation.system, conversation.turns[-1:]).messages()))
    if alone >= max_len:  # the engine needs at least one free position for the reply
        conversation.turns.pop()
        console.print(f"(message not sent: with the system message it takes {alone} tokens, and the model's "
                      f"context is {max_len}; shorten it, or the system message with /system)", style=REASONING_STYLE)
        return None
    dropped = 0
    while len(ids) + room > max_len and len(conversation.turns) > 1:
        del conversation.turns[:2]  # the oldest user message and its reply
        dropped += 2
        ids = prompt_ids(engine, conversation.messages())
    if dropped:
        console.print(f"(the conversation outgrew the model's context of {max_len} tokens: dropped the {dropped} "
                      "oldest messages)", style=REASONING_STYLE)
    return ids


def _turn(engine: Engine, params: SamplingParams, conversation: Conversation, text: str, console: Console) -> None:
    """Generate and print one reply; on Ctrl-C drop the turn."""
    conversation.turns.append({"role": "user", "content": text})
    ids = _fit_context(engine, params, conversation, console)
    if ids is None:
        return
    printer, timer = ReplyPrinter(console), StreamTimer(prompt_tokens=len(ids))
    try:
        with closing(engine.stream([ids], params)) as stream:
            for step in timer.run(stream):
                printer.feed("".join(d.text for d in step))
    except KeyboardInterrupt:
        printer.finish()
        conversation.turns.pop()
        console.print("(reply interrupted)", style=REASONING_STYLE)
        return
    reply = printer.finish()
    conversation.turns.append({"role": "assistant", "content": reply.content})
    console.print(f"({timer.tokens} tokens, {timer.decode_tokens_per_s:.1f} tokens/s; prompt {timer.prompt_tokens} "
                  f"tokens, {timer.prompt_tokens_per_s:.1f} tokens/s)", style=REASONING_STYLE)
