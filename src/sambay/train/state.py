"""Training checkpoints: atomic, pickle-free, resumable under any data-parallel wrapper.

A checkpoint is a directory ``checkpoints/step_00000100/``::

    model.safetensors        full (unsharded) fp32 parameters under their plain SambaY names
    optimizer.safetensors    AdamW state per parameter: "<name>/exp_avg", "<name>/exp_avg_sq", "<name>/step"
    rng_rank<r>.safetensors  each rank's torch (and CUDA) RNG state
    trainer.json             step, data position, the optimiser's param-group settings, the TrainConfig

Atomicity: everything is written into ``.tmp-step_…`` and fsynced; ``trainer.json`` comes last; the
directory is then renamed to its final name and the ``latest`` pointer is replaced with `os.replace`.
A crash at any point leaves the previous checkpoint and ``latest`` untouched; the stale temporary
directory is removed by the next save. Nothing is unpickled on load (safetensors + JSON only).
A directory is only ever deleted after being renamed to ``.tmp-…``, so every ``step_*`` directory is
complete, whenever the process dies.

Pruning (issue 13): a save removes only checkpoints of *earlier* steps than the one it has just put
in place, never that one nor later steps (they sort after it, and used to take its place in the
``keep`` newest). When ``latest`` is missing or names a missing or incomplete directory,
`latest_checkpoint` falls back to the newest complete one and says so. A run that does not resume
first moves an earlier run's checkpoints aside (`set_aside`), so the two runs never mix.

Full state dicts come from ``torch.distributed.checkpoint.state_dict``, which strips the DDP,
FSDP2, checkpoint-wrapper and compile prefixes and gathers DTensor shards, so a checkpoint written
by one layout loads into another (the same code path serves one process, DDP and FSDP).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sambay.train.data import fsync_dir

log = logging.getLogger("sambay.train")

LATEST = "latest"
CHECKPOINT_NAME = re.compile(r"step_(\d+)")
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors", "trainer.json")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters on the CPU under plain names (collective under FSDP; empty off rank 0 there)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=options).items()}


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    if not state:  # ranks other than 0 receive nothing with cpu_offload
        return {}, []
    tensors = {f"{name}/{key}": torch.as_tensor(value).cpu() for name, entry in state["state"].items()
               for key, value in entry.items()}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def _write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any],
    *, keep: int = 2,
) -> Path:
    """Writes the checkpoint of ``step`` atomically. Collective: every rank calls it.

    Args:
        root: the checkpoints directory.
        step: optimiser steps completed.
        model: the (possibly wrapped) model.
        optimizer: its optimiser.
        trainer: JSON-serialisable loop state (data position, config, ...).
        keep: how many checkpoints to keep: this one and the ``keep - 1`` newest of earlier steps
            (removed after the new one is in place; later steps are left alone; <= 0 keeps all).

    Returns:
        The final directory.
    """
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    model_state = full_model_state(model)
    optim_options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    optim_tensors, groups = _flatten_optimizer(get_optimizer_state_dict(model, optimizer, options=optim_options))
    if _rank() == 0:
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    _write(tmp / f"rng_rank{_rank()}.safetensors", lambda p: save_file(rng, p))
    _barrier()
    if _rank() == 0:
        _write(tmp / "model.safetensors", lambda p: save_file(model_state, p))
        _write(tmp / "optimizer.safetensors", lambda p: save_file(optim_tensors, p))
        record = {"step": step, "param_groups": groups, **trainer}
        _write(tmp / "trainer.json", lambda p: p.write_text(json.dumps(record, indent=2)))
        if final.exists():  # a re-save of the same step (after a resume); the old copy is complete
            _discard(final)
        os.rename(tmp, final)
        fsync_dir(root)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        fsync_dir(root)
        earlier = [path for s, path in _checkpoints(root) if s < step]
        for old in earlier[: max(len(earlier) - (keep - 1), 0)] if keep > 0 else []:
            _discard(old)
    _barrier()
    return final


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every ``step_<n>`` directory under ``root``, by step."""
    found = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def _discard(path: Path) -> None:
    """Deletes a checkpoint directory, renaming it to ``.tmp-…`` first.

    `shutil.rmtree` killed half-way would leave a ``step_*`` directory that looks complete but lacks
    files; a renamed one is only a stale temporary that the next save removes.
    """
    doomed = path.with_name(f".tmp-discard-{path.name}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory holding every file a resume reads."""
    return CHECKPOINT_NAME.fullmatch(path.name) is not None and all((path / f).is_file() for f in REQUIRED_FILES)


def latest_checkpoint(root: str | Path, say: Callable[[str], None] = log.warning) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names, else the newest complete one, else None.

    A missing or bad ``latest`` (naming a missing or incomplete directory) is reported through ``say``
    before falling back: a resume from an older step than expected must never go unnoticed.
    """
    root = Path(root)
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named.parent == root and is_complete(named):
        return named
    complete = [path for _, path in _checkpoints(root) if is_complete(path)]
    problem = f"{pointer} names {named.name!r}, missing or incomplete" if named else f"{pointer} is missing"
    if complete:
        say(f"{problem}: resuming from the newest complete checkpoint, {complete[-1].name}")
        return complete[-1]
    if named is not None:
        say(f"{problem}, and there is no complete checkpoint in {root}: starting from step 0")
    return None


def set_aside(root: str | Path) -> Path | None:
    """Moves ``root`` (an earlier run's checkpoints) to ``<root>.old-<n>`` if it holds anything.

    For a run that does not resume (``resume = False``). Keeping the earlier checkpoints beside the
    new ones mixes two runs: a resume could continue the wrong one, and `keep` could count theirs.
    Deleting them would lose work on a mistyped flag. One rename is atomic, keeps everything, and
    leaves the new run a directory of its own. Collective: every rank calls it.

    Returns:
        Where the checkpoints went, or None when there was nothing to move.
    """
    root, moved = Path(root), None
    if _rank() == 0 and root.is_dir() and any(root.iterdir()):
        n = 1
        while (moved := root.with_name(f"{root.name}.old-{n}")).exists():
            n += 1
        os.rename(root, moved)
        fsync_dir(root.parent)
    _barrier()
    return moved


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restores model, optimiser and this rank's RNG from ``path``; returns the trainer record.

    Every rank reads the full tensors and keeps its own shard (FSDP) or a replica (DDP).
    """
    path = Path(path)
    record = json.loads((path / "trainer.json").read_text())
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(path / "model.safetensors"), options=options)
    optim_state = _unflatten_optimizer(load_file(path / "optimizer.safetensors"), record["param_groups"])
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
    rng_file = path / f"rng_rank{_rank()}.safetensors"
    if rng_file.exists():
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return record
