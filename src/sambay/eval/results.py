"""A resumable results file: JSON Lines written one record at a time, read back to skip finished work.

    {"header": {"task": "math", "data_sha256": "…", "model": "…", "prompt": "…", "sampling": {…}}}
    {"problem": 0, "sample": 0, "text": "…", "extracted": "402", "correct": true, …}
    {"problem": 0, "sample": 1, …}

The first line names the settings the records were made with; a run that finds a header with other
settings refuses the file rather than mixing two experiments in one score. Each record is flushed as soon
as it is written, so an interrupted run (Ctrl-C, a lost machine) loses at most the line being written: a
last line without its newline is cut off when the file is opened again, and the run goes on from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any


class ResultsFile:
    """Append-only JSONL of records keyed by some of their fields, with a settings header.

    Args:
        path: the file (created with its directory when missing); None keeps nothing (a run without --out).
        header: the settings of this run; must equal the header of an existing file.
        key_fields: the fields that identify a record (e.g. ``("problem", "sample")``).
    """

    def __init__(self, path: str | Path | None, header: Mapping[str, Any], key_fields: Iterable[str]):
        self.path = None if path is None else Path(path)
        self.header, self.key_fields = dict(header), tuple(key_fields)
        self._file: IO[str] | None = None

    def open(self) -> dict[tuple, dict]:
        """Read the records already in the file (a torn last line is dropped) and open it for appending.

        Returns:
            The finished records by key (a repeated key keeps the last record).

        Raises:
            ValueError: the file was written with other settings, or a line in the middle is not JSON.
        """
        records: dict[tuple, dict] = {}
        if self.path is None:
            return records
        if self.path.is_file() and self.path.stat().st_size:
            lines = _complete_lines(self.path)
            header = _parse(lines[0], self.path, 1).get("header") if lines else None
            if lines and header != _round_trip(self.header):
                changed = "; ".join(_differences(header, self.header))
                raise ValueError(f"{self.path} holds results of another run ({changed}); use another --out or "
                                 "delete it")
            for number, line in enumerate(lines[1:], start=2):
                record = _parse(line, self.path, number)
                records[self.key(record)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        if not records and self._file.tell() == 0:
            self._write({"header": self.header})
        return records

    def key(self, record: Mapping[str, Any]) -> tuple:
        """The key of a record."""
        return tuple(record[name] for name in self.key_fields)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record and flush it to the operating system (nothing without a path)."""
        if self.path is None:
            return
        if self._file is None:
            raise RuntimeError("open() the results file before appending to it")
        self._write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()


def _complete_lines(path: Path) -> list[str]:
    """The file's newline-terminated lines; a torn last line (a write cut short) is truncated away."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    return [line for line in data[:end].decode("utf-8").split("\n") if line.strip()]


def _parse(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not a JSON line ({e.msg}); is this a results file?") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object")
    return record


def _round_trip(header: Mapping[str, Any]) -> dict:
    """The header as it reads back from the file (tuples become lists)."""
    return json.loads(json.dumps(dict(header)))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ (one level into nested objects)."""
    if not isinstance(old, dict):
        return ["the header (none found)"]
    new = _round_trip(new)
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if a != b:
            nested = not prefix and isinstance(a, dict) and isinstance(b, dict)
            out += _differences(a, b, f"{k}.") if nested else [f"{prefix}{k}: {a!r} → {b!r}"]
    return out
