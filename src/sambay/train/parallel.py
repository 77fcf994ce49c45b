"""Parallelism, activation checkpointing and compilation, applied from outside to an unmodified SambaY.

Order as in torchtitan's ``parallelize``: activation checkpointing, then compile, then data
parallelism (FSDP2 or DDP). Each unit is one residual `Block` of either decoder: the model iterates
its ``layers`` ModuleLists, so wrapping or compiling the entries in place changes nothing else.

- `apply_ac` wraps each block in PyTorch's non-reentrant checkpoint wrapper (recompute in backward).
- `apply_compile` compiles each block in place (``Module.compile``: parameter names are unchanged).
- `apply_fsdp` shards each block, then the root (embedding, final norm, tied head), with
  ``torch.distributed.fsdp.fully_shard`` (FSDP2; DTensor parameters). Parameters stay fp32; bf16
  compute comes from autocast in the loop, so the fp32-only parameters (``A_log``, λ) need no policy.
- `apply_ddp` wraps the model in DistributedDataParallel.

`no_sync` skips the gradient all-reduce / reduce-scatter on all but the last micro-step of gradient
accumulation, for either wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from sambay.model.sambay import SambaY


def _layer_lists(model: SambaY) -> list[nn.ModuleList]:
    return [model.self_decoder.layers, model.cross_decoder.layers]


def apply_ac(model: SambaY) -> SambaY:
    """Recompute every block's activations in backward instead of storing them."""
    for layers in _layer_lists(model):
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def apply_compile(model: SambaY) -> SambaY:
    """``torch.compile`` each block in place (one compiled graph per block, reused across same-shape blocks)."""
    for layers in _layer_lists(model):
        for block in layers:
            block.compile()
    return model


def apply_fsdp(model: SambaY, mesh: DeviceMesh | None = None) -> SambaY:
    """Shard parameters, gradients and optimiser state across the data-parallel ranks (FSDP2)."""
    for layers in _layer_lists(model):
        for block in layers:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_ddp(model: SambaY, device: torch.device) -> DistributedDataParallel:
    """Replicate ``model`` on every rank; gradients are averaged in backward.

    Buffers are not broadcast before each forward: the model's only buffers are a QLoRA base's int weights
    and scales, frozen and quantised alike on every rank, and broadcasting them for a 3.85B base would move
    about 2 GB per micro-batch."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Inside, backward accumulates local gradients without communication when ``skip`` is true."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(not skip)
        yield
        model.set_requires_gradient_sync(True)
    elif isinstance(model, DistributedDataParallel) and skip:
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: nn.Module) -> SambaY:
    """The SambaY inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
