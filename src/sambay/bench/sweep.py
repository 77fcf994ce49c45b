"""Sweeps of a kernel module's launch knobs (the constants at the top of `sambay.ops.triton.*`), for the
benchmarks that pick their defaults (benchmarks/attn_decode.py, benchmarks/attn_prefill.py)."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from types import ModuleType

import torch


def sweep_knobs(module: ModuleType, grid: dict[str, tuple], cases: dict[str, Callable[[], torch.Tensor]],
                measure: Callable[[Callable[[], torch.Tensor]], float], unit: str, max_seconds: float,
                tolerance: float = 0.05, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Rows ``{knob: value, ..., unit: {case: measure(case)}}``, the module's current setting first (the one
    every output is checked against), then the grid in a seeded shuffle, so a sweep cut short by
    ``max_seconds`` still samples the whole grid. A setting whose output differs from the first's by more than
    ``tolerance``, or that fails (a tile too large for shared memory, say), gets ``"error"`` instead of times.
    The knobs are left at the last setting tried."""
    want = {name: fn().float() for name, fn in cases.items()}
    settings = list(itertools.product(*grid.values()))
    random.Random(0).shuffle(settings)
    settings.insert(0, tuple(getattr(module, name) for name in grid))
    rows, started = [], time.monotonic()
    for values in settings:
        if time.monotonic() - started > max_seconds:
            break
        setting = dict(zip(grid, values, strict=True))
        for name, value in setting.items():
            setattr(module, name, value)
        row = {**setting, unit: {}}
        try:
            for name, fn in cases.items():
                err = float((fn().float() - want[name]).abs().max())
                if err > tolerance:
                    raise AssertionError(f"{name}: max abs error {err:.3g} against the default setting")
                row[unit][name] = measure(fn)
        except Exception as e:  # the setting is skipped, the sweep goes on
            row["error"] = str(e)[:200]
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
