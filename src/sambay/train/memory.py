"""How much memory a training step needs, and the micro-batch that fits on the CPU (issue 12).

The kernel's out-of-memory killer ends a CPU process without a word (the arithmetic recipe's micro-batch
of 64 × 512 tokens was killed at 23 GB on a 24 GB machine), while CUDA raises a readable error; so on
the CPU the trainer checks before the first step and, if the micro-batch does not fit, splits it into
``k`` micro-steps of ``micro_batch_size / k`` (``grad_accum`` × k, ``eval_batches`` × k). Batches are
defined globally (see `sambay.train.loop`), so the split changes neither the data, the updates nor
the held-out windows, only the memory and the speed.

The estimate is measured, not modelled: one forward of a single sequence of ``seq_len`` tokens,
under `torch.autograd.graph.saved_tensors_hooks`, sums the storages autograd keeps for backward
(parameters excluded; a storage shared by several saved views counted once). Everything the
reference ops save is seen, whatever they are. A step's peak is that, times the micro-batch, times
``PEAK_OVER_SAVED``, plus gradients and AdamW's two moments (3 × the fp32 parameter bytes).

``PEAK_OVER_SAVED`` is the resident memory over the saved bytes, measured on the arithmetic preset
(512-token sequences, 2 cores, fp32 and bf16 autocast alike): 1.15-1.2 in the first forward/backward,
2.2-2.3 from the second on, and over whole `sambay train` runs of 16 micro-steps 2.3 (micro-batch 8)
and 2.6 (micro-batch 4). glibc's allocator keeps the freed activations of one micro-step in its heap
(its dynamic mmap threshold grows with the large frees) and cannot fully reuse them for the next; with
``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment the ratio stays at 1.04. Activation
checkpointing gets no credit for the same reason: the bytes alive fall to a third, but the resident
memory of one step measured 1.38 × the un-checkpointed saved bytes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sambay.train.config import TrainConfig
from sambay.train.evaluate import token_nll

PEAK_OVER_SAVED = 2.7  # measured up to 2.6 over whole runs (module docstring)
USABLE_FRACTION = 0.85  # of the available memory: the rest is left to the allocator's slack and the OS


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes one training step needs: ``per_sequence`` × micro-batch + ``fixed``."""

    per_sequence: int  # activations kept for backward, with the transient factor, per sequence
    fixed: int  # gradients and the two AdamW moments

    def step_bytes(self, micro_batch_size: int) -> int:
        return self.per_sequence * micro_batch_size + self.fixed


def saved_bytes(model: nn.Module, seq_len: int, device: torch.device, autocast) -> int:
    """Bytes autograd keeps for backward from one training forward of one sequence of ``seq_len`` tokens.

    Args:
        model: SambaY in training mode, unwrapped (a DDP wrapper would expect a backward).
        seq_len: tokens of the sequence.
        device: where the model is.
        autocast: the run's autocast context.

    Returns:
        The bytes of the distinct storages saved for backward, parameters excluded.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=device)  # (1, t)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        token_nll(model, tokens, tokens).sum()  # the graph, and what it saved, is freed on return
    return sum(saved.values())


def step_memory(model: nn.Module, config: TrainConfig, device: torch.device, autocast) -> StepMemory:
    """The measured `StepMemory` of ``model`` at ``config.seq_len`` (see the module docstring)."""
    per_sequence = saved_bytes(model, config.seq_len, device, autocast)
    # fp32 gradients and moments of the trained parameters (all of them, or a LoRA run's adapters)
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return StepMemory(per_sequence=int(per_sequence * PEAK_OVER_SAVED), fixed=3 * parameter_bytes)


def available_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in meminfo.splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024  # "123456 kB"
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: MemAvailable alone
    return available


def fit_micro_batch(config: TrainConfig, memory: StepMemory, available: int) -> TrainConfig:
    """``config`` with its micro-batch split into the fewest micro-steps whose step fits in ``available``.

    Args:
        config: the run's config.
        memory: what a step needs.
        available: bytes this process may use (the caller divides by processes sharing the host).

    Returns:
        ``config`` itself when it fits; else `split_micro_batch` by the smallest ``k`` dividing
        micro_batch_size whose micro-batch fits in `USABLE_FRACTION` of ``available``.

    Raises:
        ValueError: not even one sequence fits; the message names the flags that help.
    """
    budget = int(available * USABLE_FRACTION)
    micro = config.micro_batch_size
    for k in (k for k in range(1, micro + 1) if micro % k == 0):
        if memory.step_bytes(micro // k) <= budget:
            return split_micro_batch(config, k)
    raise ValueError(
        f"one sequence of {config.seq_len} tokens needs ~{gib(memory.step_bytes(1))} to train, "
        f"{gib(budget)} usable: lower --seq-len (or use a GPU)")


def split_micro_batch(config: TrainConfig, k: int) -> TrainConfig:
    """micro_batch_size / k, grad_accum × k, eval_batches × k: the same global batch and held-out windows."""
    if k == 1:
        return config
    return dataclasses.replace(config, micro_batch_size=config.micro_batch_size // k,
                               grad_accum=config.grad_accum * k, eval_batches=config.eval_batches * k)


def fit_to_memory(config: TrainConfig, model: nn.Module, device: torch.device, autocast, say=print) -> TrainConfig:
    """On the CPU: `fit_micro_batch` to the host's available memory; says what it chose.

    Processes of one run on one host share its memory (torchrun's LOCAL_WORLD_SIZE); under several
    processes every rank takes the largest split any rank needs, so all run the same micro-steps. On
    CUDA, or where the available memory is unknown, ``config`` is returned unchanged.
    """
    available = available_bytes() if device.type == "cpu" else None
    if available is None:
        return config
    available //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    memory = step_memory(model, config, device, autocast)
    k = config.micro_batch_size // fit_micro_batch(config, memory, available).micro_batch_size
    if dist.is_initialized():
        agreed = torch.tensor([k], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        k = int(agreed)
    fitted = split_micro_batch(config, k)
    if k == 1:
        say(f"memory: a step needs ~{gib(memory.step_bytes(config.micro_batch_size))} of {gib(available)} available")
    else:
        say(f"memory: a micro-batch of {config.micro_batch_size} x {config.seq_len} tokens needs "
            f"~{gib(memory.step_bytes(config.micro_batch_size))}, {gib(available)} available: running "
            f"{fitted.grad_accum} micro-batches of {fitted.micro_batch_size} per step instead (same global batch, "
            f"~{gib(memory.step_bytes(fitted.micro_batch_size))}; set --micro-batch-size / --grad-accum to choose)")
    return fitted


def gib(n: int) -> str:
    """``n`` bytes as "1.2 GB" (GiB)."""
    return f"{n / 2**30:.1f} GB"
