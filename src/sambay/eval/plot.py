"""Accuracy against context length, as a PNG (or any format matplotlib writes): the retrieval tests' plot.

matplotlib is optional (``pip install 'sambay[plot]'``); it is imported only when a plot is asked for, and
drawn on a `Figure` of its own (no pyplot, so no global backend or state changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def plot_accuracy(curves: Mapping[str, Mapping[int, float]], path: str | Path, title: str) -> None:
    """One line per curve: accuracy (0-1) against context length in tokens, log-2 axis.

    Args:
        curves: label → {context length: accuracy}.
        path: output file; its suffix picks the format (.png, .svg, .pdf).
        title: the plot's title.

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'sambay[plot]'") from None
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, points in curves.items():
        lengths = sorted(points)
        axes.plot(lengths, [points[n] for n in lengths], marker="o", label=label)
    axes.set_xscale("log", base=2)
    lengths = sorted({n for points in curves.values() for n in points})
    axes.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=150)
