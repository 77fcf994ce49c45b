"""Tensor parallelism for inference, applied from outside to an unmodified `SambaY` (Megatron-style).

Each of N ranks keeps a 1/N slice of every mixer and MLP and runs the same layer code on it; the
model files never import `torch.distributed` (gpt-fast `tp.py`, torchtitan `parallelize`). Per layer:

    layer            column-parallel (output split)              row-parallel (input split, all-reduce)
    attention        qkv / q_proj: whole heads (q, k, v parts)    out_proj
    Mamba            in_proj (x and z parts), conv, dt_proj,      x_proj (all-reduce Δ-low, B, C),
                     A_log, D                                     out_proj
    GMU              in_proj                                      out_proj
    SwiGLU MLP       in_proj (gate and up parts)                  out_proj
    replicated       embedding, tied LM head, norms, λ vectors and subln weight (shared by all heads)

Differential attention pairs query heads (2j, 2j+1) with key/value pair (2g, 2g+1), g = j // (n_heads /
n_kv_heads), so contiguous head shards that hold whole kv pairs keep every query pair with its keys: the
per-rank module is itself a differential attention with n_heads/N and n_kv_heads/N heads. The shared KV
is produced by the sharded full-attention layer, so each rank's cross-attention layers read their own
kv heads; the GMU memory comes from the sharded memory Mamba, split like the GMU's in_proj. Both agree.

Row-parallel outputs are summed by a forward hook (an all-reduce over the group). A row-parallel bias
would be added N times, so rank 0 keeps it and the other ranks zero theirs: it is added exactly once.
All-reduces give every rank the same bits, so the replicated tail (norm, LM head) and a sampler seeded
alike produce the same token everywhere and the ranks step in lockstep.

The per-rank shapes cannot be written as a `SambaYConfig` (``head_dim`` = d_model // n_heads and
``d_inner`` = expand · d_model would change), so the full config is kept, the size attributes of the
sharded modules (``n_heads``, ``n_kv_heads``, ``in_features``, ...) are updated, and the model's class is
swapped for a subclass whose `new_cache` allocates the local sizes (FSDP2's ``fully_shard`` swaps classes
the same way). Inference only: the all-reduce is not differentiable.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from sambay.config import LayerKind, SambaYConfig
from sambay.model.attention import CrossAttention, FullAttention, SlidingWindowAttention
from sambay.model.gmu import GatedMemoryUnit
from sambay.model.mamba import Mamba
from sambay.model.mlp import SwiGLUMLP
from sambay.model.sambay import SambaY


def check_tensor_parallel(config: SambaYConfig, n: int) -> None:
    """Raise ValueError, naming every obstacle, unless a model of ``config`` splits ``n`` ways."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"the tensor-parallel size must be a positive int, got {n!r}")
    problems = []
    has_attention = any(k not in (LayerKind.MAMBA, LayerKind.GMU) for k in config.plan)
    if has_attention and config.differential and (config.n_kv_heads // 2) % n:
        problems.append(f"its {config.n_kv_heads // 2} differential kv-head pairs (n_kv_heads = "
                        f"{config.n_kv_heads}) do not split into {n} groups of whole pairs")
    elif has_attention and config.n_kv_heads % n:
        problems.append(f"n_kv_heads ({config.n_kv_heads}) is not divisible by {n}")
    if any(k in (LayerKind.MAMBA, LayerKind.GMU) for k in config.plan) and config.d_inner % n:
        problems.append(f"d_inner ({config.d_inner}) is not divisible by {n}")
    if config.d_ff % n:
        problems.append(f"d_ff ({config.d_ff}) is not divisible by {n}")
    if problems:
        raise ValueError(f"this model cannot be split {n} ways for tensor parallelism: " + "; ".join(problems))


def tensor_parallel(model: SambaY, group: dist.ProcessGroup | None = None) -> SambaY:
    """Keep this rank's shard of every mixer and MLP, in place, and sum row-parallel outputs over ``group``.

    Every rank must hold the same full weights beforehand and call this with the same group; afterwards
    every forward (and `new_cache`) must run on all ranks together.

    Args:
        model: an unsharded SambaY (any dtype and device; the group's backend must serve that device).
        group: the tensor-parallel process group (default: the world). Its size N is the split.

    Returns:
        ``model``, now of a `TensorParallel` subclass; its `new_cache` allocates this rank's cache.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor_parallel needs torch.distributed to be initialised (init_process_group)")
    if isinstance(model, TensorParallel):
        raise ValueError("this model is already tensor-parallel")
    group = group if group is not None else dist.group.WORLD
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    check_tensor_parallel(model.config, n)
    reduce = functools.partial(_all_reduce_output, group=group)
    for module in list(model.modules()):
        match module:
            case SlidingWindowAttention() | FullAttention() | CrossAttention():
                _shard_attention(module, rank, n, reduce)
            case Mamba():
                _shard_mamba(module, rank, n, reduce)
            case GatedMemoryUnit():
                _split_out(module.in_proj, rank, n)
                _split_in(module.out_proj, rank, n, reduce)
            case SwiGLUMLP():
                _split_out(module.in_proj, rank, n, sections=2)
                _split_in(module.out_proj, rank, n, reduce)
    model.__class__ = _parallel_class(type(model))
    model.tensor_parallel_size = n
    return model


class TensorParallel:
    """Mixin marking a tensor-parallel SambaY (`SambaY.new_cache` already sizes its cache from the
    sharded modules: this rank's heads and channels)."""

    tensor_parallel_size: int


@functools.cache
def _parallel_class(cls: type) -> type:
    return type(f"TensorParallel{cls.__name__}", (TensorParallel, cls), {})


# sharding --------------------------------------------------------------------------------------------


def _shard_attention(module: nn.Module, rank: int, n: int, reduce) -> None:
    """Whole heads per rank: the q, k and v blocks of the fused projection are split separately."""
    hd = module.head_dim
    if isinstance(module, CrossAttention):
        _split_out(module.q_proj, rank, n)
    else:
        q, kv = module.n_heads * hd, module.n_kv_heads * hd
        _split_out(module.qkv, rank, n, sections=(q, kv, kv))
        module.n_kv_heads //= n
    module.n_heads //= n
    _split_in(module.out_proj, rank, n, reduce)


def _shard_mamba(module: Mamba, rank: int, n: int, reduce) -> None:
    """Split d_inner: every per-channel parameter, the x and z halves of in_proj; reduce x_proj, out_proj."""
    _split_out(module.in_proj, rank, n, sections=2)
    conv = module.conv
    conv.weight = _slice_param(conv.weight, rank, n)  # (d_inner / n, 1, d_conv)
    if conv.bias is not None:
        conv.bias = _slice_param(conv.bias, rank, n)
    conv.in_channels = conv.out_channels = conv.groups = conv.weight.shape[0]
    _split_out(module.dt_proj, rank, n)
    module.A_log = _slice_param(module.A_log, rank, n)
    module.D = _slice_param(module.D, rank, n)
    _split_in(module.x_proj, rank, n, reduce)
    _split_in(module.out_proj, rank, n, reduce)


def _split_out(linear: nn.Linear, rank: int, n: int, sections: int | tuple[int, ...] = 1) -> None:
    """Column parallel: keep this rank's 1/n of each output section (e.g. gate and up) of weight and bias."""
    linear.weight = _slice_param(linear.weight, rank, n, sections)
    if linear.bias is not None:
        linear.bias = _slice_param(linear.bias, rank, n, sections)
    linear.out_features = linear.weight.shape[0]


def _split_in(linear: nn.Linear, rank: int, n: int, reduce) -> None:
    """Row parallel: keep this rank's 1/n of the input features; partial outputs are summed by ``reduce``."""
    weight = linear.weight.detach()
    width = weight.shape[1] // n
    linear.weight = nn.Parameter(weight[:, rank * width : (rank + 1) * width].clone(), linear.weight.requires_grad)
    linear.in_features = width
    if linear.bias is not None and rank:  # the sum over ranks then adds the bias exactly once
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), linear.bias.requires_grad)
    linear.register_forward_hook(reduce)


def _slice_param(p: nn.Parameter, rank: int, n: int, sections: int | tuple[int, ...] = 1) -> nn.Parameter:
    """Rank's 1/n of each section of dim 0 (``sections``: a count of equal sections or their sizes)."""
    parts = p.detach().chunk(sections, dim=0) if isinstance(sections, int) else p.detach().split(sections, dim=0)
    kept = [part.chunk(n, dim=0)[rank] for part in parts]
    return nn.Parameter(torch.cat(kept), p.requires_grad)  # a copy: the full tensor can be freed


def _all_reduce_output(module: nn.Module, inputs: tuple, output: Tensor, *, group: dist.ProcessGroup) -> Tensor:
    """Forward hook: sum a row-parallel projection's partial outputs over the group."""
    return funcol.all_reduce(output, "sum", group)
