"""Run logging: one JSON object per line in ``out_dir/log.jsonl``, optionally TensorBoard scalars too.

Only rank 0 logs. The JSONL file is appended to, so a resumed run continues the same file (a step
logged twice, before a crash and after the resume, appears twice; readers keep the last).
TensorBoard is optional (``pip install tensorboard``); asking for it without the package is an error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricLogger:
    """Writes metrics of rank 0; a no-op elsewhere.

    Args:
        out_dir: the run directory.
        enabled: False on ranks other than 0.
        tensorboard: also write TensorBoard events under ``out_dir/tensorboard``.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self._file = open(Path(out_dir) / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (lives with the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

            self._writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def log(self, step: int, kind: str, **values: Any) -> None:
        """Appends ``{"step", "kind", "time", **values}``; ``kind`` is "train", "eval" or "final"."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._writer is not None:
                self._writer.close()


def read_log(path: str | Path, kind: str = "train") -> dict[int, dict]:
    """Step -> last record of ``kind`` in a ``log.jsonl`` (later lines win, as after a resume)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            out[record["step"]] = record
    return out
