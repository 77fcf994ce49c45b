"""Terminal output of a streamed reply: the reasoning trace dimmed, then the answer.

Text deltas go through `ReasoningParser`, so the `<think>` tags never reach the screen. On a terminal
the reasoning is printed dim (rich styles); when stdout is a pipe rich drops the styles and prints the
plain text. Model text is printed verbatim: no rich markup, highlighting or emoji codes. A reader that
closes the pipe early raises `BrokenPipeError` (rich would exit 1), which `sambay.cli.__main__` turns
into a quiet exit 141.
"""

from __future__ import annotations

import errno
import os

from rich.console import Console

from sambay.text.reasoning import ReasoningParser, ReasoningSplit

REASONING_STYLE = "dim"


class _Console(Console):
    def on_broken_pipe(self) -> None:
        self.quiet = True  # drop whatever is still buffered
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def make_console(*, stderr: bool = False) -> Console:
    """A console that prints model text as-is."""
    return _Console(stderr=stderr, highlight=False, emoji=False, markup=False, soft_wrap=True)


class ReplyPrinter:
    """Prints text deltas as they arrive, reasoning dimmed and separated from the answer.

    Args:
        console: where to print.
        parse_reasoning: split `<think>...</think>` off (False: print everything as the answer).
    """

    def __init__(self, console: Console, *, parse_reasoning: bool = True):
        self.console = console
        self.parser = ReasoningParser() if parse_reasoning else None
        self.reasoning, self.content = [], []

    def feed(self, delta: str) -> None:
        """Print one text delta."""
        self._show(self.parser.feed(delta) if self.parser else ReasoningSplit(content=delta))

    def finish(self) -> ReasoningSplit:
        """Flush held-back text, end the line; returns the whole reasoning and answer."""
        if self.parser:
            self._show(self.parser.finish())
        self.console.print()
        return ReasoningSplit("".join(self.reasoning), "".join(self.content))

    def _show(self, split: ReasoningSplit) -> None:
        if split.reasoning:
            self.console.print(split.reasoning, style=REASONING_STYLE, end="")
            self.reasoning.append(split.reasoning)
        if split.content:
            if self.reasoning and not self.content:
                self.console.print("\n")  # a blank line between the trace and the answer
            self.console.print(split.content, end="")
            self.content.append(split.content)
        self.console.file.flush()
