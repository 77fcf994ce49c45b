"""The pieces a run is assembled from: process group, tokenizer, data, model. Each is one named function.

Distributed runs are launched by ``torchrun`` (or anything that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``): NCCL on CUDA, gloo on the CPU. One process per
GPU; on the CPU every rank shares the host.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from sambay.checkpoint import load_model, model_directory
from sambay.config import PRESETS
from sambay.model.sambay import SambaY
from sambay.ops import Ops, for_training
from sambay.quant import QuantizedLinear, QuantSpec, quantize_model
from sambay.quant.format import read_spec
from sambay.tokenizer import Tokenizer, load_tokenizer
from sambay.train.config import TrainConfig
from sambay.train.data import PackedData, prepare_data
from sambay.train.parallel import apply_ac, apply_compile, apply_ddp, apply_fsdp
from sambay.train.progress import Reporter


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among ``world`` and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(config: TrainConfig) -> Runtime:
    """Joins the process group when launched with several processes; picks the device."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Runtime(rank, world, device)


def resolve_dtype(config: TrainConfig, device: torch.device, report: Reporter) -> TrainConfig:
    """``config`` with ``dtype = "auto"`` made concrete: bfloat16 on CUDA, float32 on the CPU.

    On the CPU bf16 autocast gains nothing and often costs: measured for a training step of the
    arithmetic preset (issue 12), it is within 10% of fp32 on a Xeon with AMX-BF16, and 4.4x slower
    than fp32 when the same machine is limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``, like a CPU
    without bf16 units), 2.4x for the tiny preset. An explicit "bfloat16" on the CPU is kept, with a note.
    """
    if config.dtype == "auto":
        return dataclasses.replace(config, dtype="bfloat16" if device.type == "cuda" else "float32")
    if config.dtype == "bfloat16" and device.type == "cpu":
        report.say("note: bf16 autocast on a CPU is no faster than fp32, and 2-4x slower without bf16 units; "
                   "--dtype float32 (or auto) trains in fp32")
    return config


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_tokenizer(config: TrainConfig) -> Tokenizer:
    """The tokenizer of ``config.tokenizer`` (default: the directory of ``init_from``)."""
    source = config.tokenizer or config.init_from
    if source is None:
        raise ValueError("set `tokenizer` (a directory with tokenizer.json) or `init_from`")
    return load_tokenizer(source)


def build_data(
    config: TrainConfig, tokenizer: Tokenizer, runtime: Runtime, report: Reporter | None = None
) -> tuple[PackedData, PackedData]:
    """Tokenizes the inputs on rank 0 (once per input set), then opens the train and eval splits."""
    if not config.train_files:
        raise ValueError("no train_files")
    report = report or Reporter()
    data_dir = Path(config.data_dir or Path(config.out_dir) / "data")
    if runtime.is_main:
        prepare_data(config.train_files, tokenizer, data_dir, eval_files=config.eval_files,
                     heldout_fraction=config.heldout_fraction, report=report)
    barrier()
    train = PackedData(data_dir, "train", config.seq_len, seed=config.seed)
    held_out = PackedData(data_dir, "eval", config.seq_len, shuffle=False)
    report.say(f"data: {train.n_windows:,} training windows of {config.seq_len} tokens, "
               f"{held_out.n_windows:,} held-out")
    return train, held_out


def build_model(config: TrainConfig, runtime: Runtime) -> SambaY:
    """A fresh model of preset ``config.model`` or the weights of ``config.init_from``, fp32, on the device;
    with ``quantize_base``, its big projections quantised (`sambay.quant.quantize_model`, as `sambay quantize`
    does); with ``lora_rank``, frozen and given adapters (`add_lora`): QLoRA when the base is quantised.

    The ops backend is "reference": the Triton kernels are inference-only (no backward), except the trainable
    selective scan that ``scan_kernel="triton"`` installs and the FlexAttention attention of ``attention_kernel``
    on a GPU (`sambay.ops.for_training`).
    """
    if config.init_from:
        model = load_model(config.init_from, dtype=torch.float32, backend="reference", progress=False)
    elif config.model not in PRESETS:
        raise ValueError(f"unknown model preset {config.model!r}; choose from {sorted(PRESETS)}")
    else:
        # built and initialised on the run's device: the full-size preset is 15 GB of fp32, minutes on a CPU;
        # every rank seeds the same generator, so every rank starts from the same weights
        with torch.device(runtime.device):
            generator = torch.Generator(runtime.device).manual_seed(config.seed)
            model = SambaY(PRESETS[config.model], backend="reference").init_weights(generator)
    if config.quantize_base:
        with torch.no_grad():
            quantize_model(model, base_quant_spec(config))
    if config.lora_rank:
        model = add_lora(model, config)
    elif is_quantized(model):  # TrainConfig refuses this first; a model loaded some other way is caught here
        raise ValueError(f"{config.init_from or config.model} is quantised: full fine-tuning needs the float "
                         "weights; train LoRA adapters on it (lora_rank > 0, QLoRA)")
    model = model.to(runtime.device).train()
    if runtime.device.type != "cuda" and config.attention_kernel == "flex":
        raise ValueError("attention_kernel='flex' needs a CUDA device: FlexAttention has no backward on the CPU")
    if runtime.device.type == "cuda" or config.scan_kernel == "triton":  # "auto" on a CPU: the references
        use_ops(model, for_training(config.scan_kernel, config.attention_kernel))
    return model


def use_ops(model: torch.nn.Module, ops: Ops) -> None:
    """Every module of ``model`` that holds an op table (`sambay.ops`) uses ``ops`` from now on."""
    for module in model.modules():
        if hasattr(module, "ops"):
            module.ops = ops


def base_quant_spec(config: TrainConfig) -> QuantSpec | None:
    """The `QuantSpec` of the run's frozen base: ``quantize_base``'s, or that of a quantised ``init_from``;
    None for a float base."""
    if config.quantize_base:
        return QuantSpec(bits=config.quantize_base, group_size=config.quantize_group_size)
    return read_spec(model_directory(config.init_from)) if config.init_from else None


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` has `QuantizedLinear` layers (its base is int8 / int4)."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def add_lora(model: SambaY, config: TrainConfig) -> SambaY:
    """Freeze ``model`` and wrap the ``lora_targets`` projections in fp32 adapters (`sambay.lora.apply_lora`).

    Under bf16 autocast the frozen base is stored in bf16 (A_log and λ stay fp32): it is only ever read
    in bf16, and it halves the memory of the weights that LoRA exists to leave alone. A quantised base
    keeps its int weights and fp32 scales (buffers, which neither the cast nor the optimiser touches). A
    seeded generator gives every rank the same A matrices.
    """
    from sambay.lora import apply_lora

    if config.dtype == "bfloat16":
        model.to_dtype(torch.bfloat16)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(config.seed + 1)
    apply_lora(model, config.lora_targets, rank=config.lora_rank, alpha=config.lora_alpha or None,
               generator=generator)
    return model


def parallelize(model: SambaY, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """Activation checkpointing, compile, then FSDP2 or DDP (torchtitan's order)."""
    if config.activation_checkpointing:
        apply_ac(model)
    if config.compile:
        apply_compile(model)
    if runtime.world == 1:
        return model
    if config.parallel == "fsdp":
        return apply_fsdp(model, init_device_mesh(runtime.device.type, (runtime.world,)))
    return apply_ddp(model, runtime.device)
