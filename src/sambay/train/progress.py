"""What a training run prints while it runs (issue 12): what it is doing, then its progress.

A `Reporter` takes messages ("tokenizing ...", "resuming from step 250", ...) and the steps. On a
terminal (rich decides, ``console.is_terminal``) a live bar shows the step, the last logged loss,
tokens/s, the elapsed time and the ETA, refreshed every step, with messages and logged steps printed
above it. Anywhere else (a pipe, a file, a CI log) there is no bar, and every logged step (the first,
then every ``log_every``) prints one plain line::

    step 50/1500 | loss 2.3456 | lr 2.00e-03 | 12,345 tokens/s | elapsed 0:01:02 | eta 0:29:50

Only rank 0 reports. A `Reporter` without a console is silent, the library default: `train` prints
nothing unless its caller passes one (`sambay train` passes one on stderr, so stdout keeps only the
final JSON line).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


def duration(seconds: float) -> str:
    """``seconds`` as h:mm:ss."""
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}"


def step_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, elapsed: float,
              eta: float) -> str:
    """One plain progress line (see the module docstring)."""
    return (f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tokens/s | "
            f"elapsed {duration(elapsed)} | eta {duration(eta)}")


class Reporter:
    """Says what the run is doing and shows its progress on ``console`` (None: silent).

    Args:
        console: where to print; a terminal gets a live bar, anything else plain lines.
    """

    def __init__(self, console: Console | None = None):
        self.console = console
        self._bar: Progress | None = None
        self._task = None
        self._first, self._t0, self._loss = 0, 0.0, float("nan")

    @property
    def is_live(self) -> bool:
        """True when a live bar is drawn (a terminal)."""
        return self.console is not None and self.console.is_terminal

    def say(self, message: str) -> None:
        """Print one line (above the bar when there is one)."""
        if self.console is not None:
            self.console.print(message)

    @contextlib.contextmanager
    def task(self, description: str, total: float) -> Iterator[Callable[[float], None]]:
        """A transient bar for a long preparation on a terminal; yields ``advance(amount)``."""
        if not self.is_live:
            yield lambda amount: None
            return
        with Progress(*Progress.get_default_columns(), console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda amount: bar.advance(task, amount)

    def start(self, step: int, max_steps: int) -> None:
        """The loop starts at ``step`` (after a resume, not 0); the clock of elapsed and ETA starts here."""
        self._first, self._t0 = step, time.perf_counter()
        if self.is_live:
            self._bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console)
            self._task = self._bar.add_task("train", total=max_steps, completed=step, status="")
            self._bar.start()

    def step(self, step: int, max_steps: int, tokens_per_s: float, loss: float | None = None,
             lr: float | None = None) -> None:
        """After each step; ``loss`` and ``lr`` on logged steps, which also print a line."""
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(step - self._first, 1) * (max_steps - step)
        if loss is not None:
            self._loss = loss
            self.say(step_line(step, max_steps, loss, lr, tokens_per_s, elapsed, eta))
        if self._bar is not None:
            status = (f"loss {self._loss:.4f} | {tokens_per_s:,.0f} tokens/s | "
                      f"{duration(elapsed)} elapsed | eta {duration(eta)}")
            self._bar.update(self._task, completed=step, total=max_steps, status=status)

    def stop(self) -> None:
        """Ends the bar (it stays on screen at its last state)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
