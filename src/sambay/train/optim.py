"""AdamW with weight decay on matrices only, and the learning-rate schedules.

Decay applies to parameters with two or more dimensions (projections, the embedding); vectors (norm
weights, biases, Mamba's ``A_log``, ``D`` and Δ bias, the λ vectors of differential attention) are not
decayed, as in nanoGPT and the Mamba recipe (decaying ``A_log`` would pull every SSM towards a fixed
time constant).

Schedules are pure functions of the step, so a resumed run needs nothing but the step:

    cosine     linear warmup, then cosine from lr to min_lr_ratio · lr at max_steps
    wsd        linear warmup, constant, then linear decay to min_lr_ratio · lr over the last
               ``decay_fraction`` of the steps (warmup-stable-decay, MiniCPM; used for the paper's
               μP++ runs)
    constant   linear warmup, then constant
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sambay.train.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters, two groups: matrices (decayed) and the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8,
                             fused=_fusable(params) or None)


def _fusable(params: list[nn.Parameter]) -> bool:
    """Whether AdamW can take its fused CUDA kernel: every parameter a plain CUDA tensor (not an FSDP2 DTensor
    shard, which stays on the default multi-tensor path). One kernel pass over parameters, gradients and both
    moments instead of the multi-tensor path's several: the optimiser step was 6% of a 900M training step
    on the H200 (docs/benchmarks.md, fine-tuning)."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.is_cuda and p.is_floating_point() and not isinstance(p.data, DTensor)
                                for p in params)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based)."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.schedule == "wsd":
        decay_start = config.max_steps - int(config.decay_fraction * config.max_steps)
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(config.max_steps - decay_start, 1)
        return peak + (floor - peak) * min(progress, 1.0)
    progress = min((step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1), 1.0)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
