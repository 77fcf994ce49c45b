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

Full state dicts come from ``torch.distributed.checkpoint.state_dict``, which strips the DDP,
FSDP2, checkpoint-wrapper and compile prefixes and gathers DTensor shards, so a checkpoint written
by one layout loads into another (the same code path serves one process, DDP and FSDP).
"""

from __future__ import annotations

import json
import os
import shutil
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

LATEST = "latest"


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
        keep: how many checkpoints to keep (oldest removed after the new one is in place).

    Returns:
        The final directory.
    """
    root = Path(root)
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    model_state = full_model_state(model)
    optim_options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    optim_tensors, groups = _flatten_optimizer(get_optimizer_state_dict(model, optimizer, options=optim_options))
    if _rank() == 0:
        for stale in root.glob(".tmp-step_*"):
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
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` points at, or None when there is no complete checkpoint."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


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
