"""Joining a tensor-parallel run started by ``torch.distributed.run`` (torchrun), for the CLI.

    python -m torch.distributed.run --nproc-per-node 2 -m sambay.cli generate --tensor-parallel 2 "..."

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
`torchrun_group` checks that the launch matches the requested size, picks this rank's device (cuda:LOCAL_RANK
with NCCL on GPUs, gloo on the CPU), initialises the default process group and destroys it on exit.
`agree_on_rng` seeds torch's global RNG from rank 0, so unseeded sampling draws the same noise everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Member:
    """This process's place in the tensor-parallel run."""

    rank: int
    size: int
    device: str  # this rank's device: "cuda:<LOCAL_RANK>" or "cpu"


@contextmanager
def torchrun_group(size: int, device: str) -> Iterator[Member]:
    """Initialise the default process group of a ``size``-process torchrun launch; destroy it afterwards.

    Args:
        size: the tensor-parallel size asked for; must equal torchrun's WORLD_SIZE.
        device: "cpu" or "cuda[:i]"; on CUDA each rank takes the GPU of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != size:
        raise ValueError(
            f"tensor parallelism over {size} ranks needs {size} processes, but WORLD_SIZE is {world or 'unset'}: "
            f"launch with `python -m torch.distributed.run --nproc-per-node {size} -m sambay.cli ...`"
        )
    backend = "gloo"
    if device.startswith("cuda"):
        device, backend = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}", "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        yield Member(rank=dist.get_rank(), size=size, device=device)
    finally:
        dist.destroy_process_group()


def agree_on_rng(device: str) -> None:
    """Seed torch's global RNG on every rank with a fresh seed drawn by rank 0 (a collective call)."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(device)  # (1,) on the backend's device
    dist.broadcast(seed, src=0)
    torch.manual_seed(int(seed.item()))
