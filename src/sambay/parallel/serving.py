"""Tensor-parallel serving: rank 0 schedules, every rank executes the same step plans on its shard.

    rank 0:   HTTP ─► EngineCore ─► BroadcastRunner.execute(plan) ─┬─ broadcast(plan) ─► the local ModelRunner
    rank k>0:                                  follow(runner) ◄┘  receive(plan) ─► the local ModelRunner

The engine core decides on the host of rank 0 and hands each step to its runner as a `StepPlan`;
`BroadcastRunner` first sends the plan (one int64 tensor, `sambay.generate.plan.encode`) and, when the
step decodes, the rows' last sampled tokens (sampling happens on rank 0 alone: the LM head is
replicated, so rank 0 has the full logits). Every rank then applies the same plan to its own cache, in
the same order, and the all-reduces inside the forwards pair up.

Broadcasts live on the process group's device (CUDA with NCCL, CPU with gloo). `BroadcastRunner.stop`
sends an empty plan length of -1; followers return from `follow`.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from sambay.generate.plan import StepPlan, decode, encode
from sambay.generate.runner import ModelRunner

log = logging.getLogger("sambay.parallel")

_STOP = -1


def _comm_device(runner: ModelRunner) -> torch.device:
    """Where broadcasts live: the runner's CUDA device under NCCL, the CPU under gloo."""
    return runner.device if dist.get_backend() == "nccl" else torch.device("cpu")


class BroadcastRunner(ModelRunner):
    """The `ModelRunner` of rank 0: each plan is broadcast to the followers, then executed here."""

    def execute(self, plan: StepPlan) -> Tensor | None:
        device = _comm_device(self)
        data = encode(plan)
        dist.broadcast(torch.tensor([data.numel()], device=device), src=0)
        dist.broadcast(data.to(device), src=0)
        if plan.decode:  # the decode rows' inputs were sampled here; the followers need them too
            tokens = self.last_tokens.to(device)
            dist.broadcast(tokens, src=0)
        return super().execute(plan)

    def stop(self) -> None:
        """Release the followers (call once, after the engine core has stopped)."""
        dist.broadcast(torch.tensor([_STOP], device=_comm_device(self)), src=0)


def follow(runner: ModelRunner) -> None:
    """Ranks > 0: execute rank 0's plans on ``runner`` until it sends the stop."""
    device = _comm_device(runner)
    with torch.inference_mode():
        while True:
            size = torch.empty(1, dtype=torch.long, device=device)
            dist.broadcast(size, src=0)
            if int(size) == _STOP:
                log.info("rank %d: stopped by rank 0", dist.get_rank())
                return
            data = torch.empty(int(size), dtype=torch.long, device=device)
            dist.broadcast(data, src=0)
            plan = decode(data.cpu())
            if plan.decode:
                tokens = torch.empty_like(runner.last_tokens, device=device)
                dist.broadcast(tokens, src=0)
                runner.last_tokens.copy_(tokens)
            runner.execute(plan)
