"""What `sambay eval` shows a person: a progress bar while it runs, a table when it is done.

The bar goes to stderr (so ``--json`` output on stdout stays one clean object) and counts finished items
(samples, prompts, windows) against the total, with a second line of text (problems finished, accuracy so
far) and the generation speed in tokens per second. On a terminal it redraws in place; redirected, rich
prints nothing until the end, so logs are not flooded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class EvalProgress:
    """A progress bar of finished items out of ``total``, with a status text and tokens per second.

    Args:
        console: where to draw (stderr).
        total: items to finish in this run (0 is fine: nothing left to do).
        description: what is counted ("samples", "prompts", "windows").
    """

    def __init__(self, console: Console, total: int, description: str):
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[status]}"), TextColumn("{task.fields[speed]}"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._task = self._bar.add_task(description, total=total, status="", speed="")
        self._tokens, self._start = 0, time.perf_counter()

    def __enter__(self) -> EvalProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.stop()

    def set_total(self, total: int) -> None:
        """The number of items, once it is known."""
        self._bar.update(self._task, total=total)

    def advance(self, n: int = 1, status: str | None = None) -> None:
        """``n`` more items finished; ``status`` replaces the status text."""
        self._bar.update(self._task, advance=n, **({} if status is None else {"status": status}))

    def add_tokens(self, n: int) -> None:
        """``n`` more generated tokens (per engine step)."""
        self._tokens += n
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(self._task, speed=f"{rate:,.0f} tok/s")


def reasoning_table(summary: Mapping[str, Any], title: str) -> Table:
    """pass@1, pass@k and counts of one reasoning run."""
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("problems", str(summary["problems"]))
    table.add_row("samples", str(summary["samples"]))
    for k, value in summary["pass_at_k"].items():
        table.add_row(f"pass@{k}", f"{100 * value:.2f}%")
    table.add_row("mean output tokens", f"{summary['mean_output_tokens']:,.1f}")
    table.add_row("cut at max tokens", str(summary.get("truncated", 0)))
    return table


def retrieval_table(by_task: Mapping[str, Mapping[int, Mapping[str, float]]], title: str) -> Table:
    """Accuracy per context length, one column per task."""
    table = Table(title=title, show_header=True)
    table.add_column("context")
    tasks = list(by_task)
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("samples", justify="right")
    table.add_column("prompt tokens", justify="right")
    lengths = sorted({n for rows in by_task.values() for n in rows})
    for n in lengths:
        cells = [f"{100 * by_task[t][n]['accuracy']:.1f}%" if n in by_task[t] else "" for t in tasks]
        any_row = next(by_task[t][n] for t in tasks if n in by_task[t])
        table.add_row(_length(n), *cells, str(any_row["samples"]), f"{any_row['mean_prompt_tokens']:,.0f}")
    return table


def perplexity_table(result: Mapping[str, float], title: str) -> Table:
    """Loss, perplexity, bits per byte and what they were measured on."""
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("loss (nats/token)", f"{result['loss']:.4f}")
    table.add_row("perplexity", f"{result['perplexity']:.3f}")
    table.add_row("bits per byte", f"{result['bits_per_byte']:.4f}")
    table.add_row("documents", f"{result['documents']:,}")
    table.add_row("tokens", f"{result['tokens']:,}")
    table.add_row("bytes", f"{result['bytes']:,}")
    table.add_row("window / stride", f"{result['window']} / {result['stride']}")
    return table


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
