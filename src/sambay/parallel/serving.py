"""Tensor-parallel serving: rank 0 schedules, every rank runs the same forwards on its shard.

    rank 0:   HTTP ─► Scheduler ─► BroadcastRunner ─┬─ broadcast(command) ─► the local ModelRunner
    rank k>0:                         follow(runner) ◄┘  receive(command) ─► the local ModelRunner

The scheduler decides on the host of rank 0; every call it makes to its `ModelRunner` (reset rows, copy
rows, write block-table rows, prefill, decode) is first broadcast as a command, so every rank applies
the same operation to its own cache, in the same order, and the all-reduces inside the forwards pair
up. The LM head is replicated, so rank 0 has the full logits and alone samples.

A command is a fixed-size int64 header (opcode and sizes) followed by its tensors, all broadcast from
rank 0 on the process group's device (CUDA with NCCL, CPU with gloo). `BroadcastRunner.stop` sends
the last command; followers return from `follow`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import IntEnum

import torch
import torch.distributed as dist
from torch import Tensor

from sambay.generate.runner import ModelRunner

log = logging.getLogger("sambay.parallel")

HEADER = 4  # int64 fields of a command header: opcode and up to three sizes


class Op(IntEnum):
    STOP = 0
    RESET_ROWS = 1
    COPY_ROWS = 2
    SET_BLOCK_ROWS = 3
    PREFILL = 4
    DECODE = 5


def _comm_device(runner: ModelRunner) -> torch.device:
    """Where broadcasts live: the runner's CUDA device under NCCL, the CPU under gloo."""
    return runner.device if dist.get_backend() == "nccl" else torch.device("cpu")


class BroadcastRunner(ModelRunner):
    """The `ModelRunner` of rank 0: each call is broadcast to the followers, then run here."""

    def _send(self, op: Op, sizes: Sequence[int], *tensors: Tensor) -> None:
        device = _comm_device(self)
        header = torch.tensor([int(op), *sizes, *[0] * (HEADER - 1 - len(sizes))], dtype=torch.long)
        dist.broadcast(header.to(device), src=0)
        for t in tensors:
            dist.broadcast(t.to(device=device, dtype=torch.long).contiguous(), src=0)

    def reset_rows(self, rows: Sequence[int]) -> None:
        self._send(Op.RESET_ROWS, [len(rows)], torch.tensor(list(rows)))
        super().reset_rows(rows)

    def copy_rows(self, src: Sequence[int], dst: Sequence[int]) -> None:
        self._send(Op.COPY_ROWS, [len(src)], torch.tensor(list(src)), torch.tensor(list(dst)))
        super().copy_rows(src, dst)

    def set_block_rows(self, rows: Sequence[int], table: Tensor) -> None:
        self._send(Op.SET_BLOCK_ROWS, [len(rows), table.shape[1]], torch.tensor(list(rows)), table)
        super().set_block_rows(rows, table)

    def prefill(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        self._send(Op.PREFILL, list(tokens.shape), tokens, lengths)
        return super().prefill(tokens, lengths)

    def decode(self, tokens: Tensor, active: Tensor) -> Tensor:
        self._send(Op.DECODE, [tokens.shape[0]], tokens, active)
        return super().decode(tokens, active)

    def stop(self) -> None:
        """Release the followers (call once, after the scheduler has stopped)."""
        self._send(Op.STOP, [])


def follow(runner: ModelRunner) -> None:
    """Ranks > 0: apply rank 0's commands to ``runner`` until it sends STOP."""
    device = _comm_device(runner)

    def receive(*shape: int) -> Tensor:
        t = torch.empty(shape, dtype=torch.long, device=device)
        dist.broadcast(t, src=0)
        return t.cpu()

    with torch.inference_mode():
        while True:
            op, a, b, _ = receive(HEADER).tolist()
            match Op(op):
                case Op.STOP:
                    log.info("rank %d: stopped by rank 0", dist.get_rank())
                    return
                case Op.RESET_ROWS:
                    runner.reset_rows(receive(a).tolist())
                case Op.COPY_ROWS:
                    runner.copy_rows(receive(a).tolist(), receive(a).tolist())
                case Op.SET_BLOCK_ROWS:
                    runner.set_block_rows(receive(a).tolist(), receive(a, b).to(torch.int32))
                case Op.PREFILL:
                    runner.prefill(receive(a, b), receive(a))
                case Op.DECODE:
                    runner.decode(receive(a, 1), receive(a).bool())
