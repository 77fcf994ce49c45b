"""The training loop, readable top to bottom (nanoGPT's shape): lr, eval, checkpoint, micro-steps, clip, step, log.

One function, `train`, runs pretraining (text), supervised fine-tuning (chat JSONL with an
assistant-only loss mask, usually with ``init_from``), on one process or many (DDP / FSDP2 under
``torchrun``). Batches are defined globally: step s reads windows ``[s·G, (s+1)·G)`` of the data
order, G = micro_batch_size · grad_accum · world, rank r taking its own slice of each micro-step,
and the loss is normalised by the number of loss tokens in the *global* batch. So the same global
batch gives the same update on any number of processes, and a resumed run reads exactly the batches
the interrupted one would have read.

Time budget: with ``max_minutes`` set, the loop times steps ``first + 5 .. first + 25`` of this
process (after the warm-up of kernels and allocator) and lowers ``max_steps`` once to the steps that
fit the budget, so the schedule (a WSD decay, say) still runs to its end; it also stops outright
if the budget is spent, then saves and evaluates as usual. The budget covers the steps only, not the
data preparation, the final evaluation or the save. A resumed run fits its own remaining budget.

Before the first step the run says what it trains (see `sambay.train.progress`: silent unless the
caller passes a `Reporter`), and on the CPU splits a micro-batch that would not fit in memory into
several micro-steps of the same global batch (`sambay.train.memory`).

Dtype policy: parameters and optimiser state fp32; forward under bf16 autocast with ``dtype =
"bfloat16"``, in fp32 with "float32"; "auto" (the default) is bf16 on CUDA and fp32 on the CPU, where
bf16 autocast is no faster (see `sambay.train.setup.resolve_dtype`); the loss in fp32. Released-format
weights are written at the end in ``save_dtype`` with `sambay.save_model`, with the tokenizer files
copied alongside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sambay.checkpoint import save_model
from sambay.model.sambay import SambaY
from sambay.train.config import TrainConfig
from sambay.train.data import PackedData
from sambay.train.evaluate import eval_loss, exact_match, summarize, token_nll
from sambay.train.memory import fit_to_memory
from sambay.train.metrics import MetricLogger
from sambay.train.optim import build_optimizer, lr_at, set_lr
from sambay.train.parallel import no_sync
from sambay.train.progress import Reporter
from sambay.train.setup import (
    Runtime,
    build_data,
    build_model,
    build_tokenizer,
    parallelize,
    resolve_dtype,
    setup_distributed,
)
from sambay.train.state import full_model_state, latest_checkpoint, load_checkpoint, save_checkpoint, set_aside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums ``values`` over ranks (float64)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _autocast(config: TrainConfig, device: torch.device):
    if config.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(config: TrainConfig, reporter: Reporter | None = None) -> dict:
    """Runs (or resumes) one training run; returns the final metrics (on every rank).

    Args:
        config: the run.
        reporter: where rank 0 says what it does and shows the progress (default: silent).
    """
    if config.objective == "dpo":
        from sambay.train.dpo import train_dpo

        return train_dpo(config, reporter)
    rt = setup_distributed(config)
    report = reporter if reporter is not None and rt.is_main else Reporter()
    config = resolve_dtype(config, rt.device, report)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config)
    train_data, eval_data = build_data(config, tokenizer, rt, report)
    model = build_model(config, rt)
    config = fit_to_memory(config, model, rt.device, _autocast(config, rt.device), report.say)
    model = parallelize(model, config, rt)
    optimizer = build_optimizer(model, config)
    micro, accum = config.micro_batch_size, config.grad_accum
    global_batch = micro * accum * rt.world
    step, last = _resume(config, model, optimizer, report), {}
    log = MetricLogger(config.out_dir, enabled=rt.is_main, tensorboard=config.tensorboard)  # after a set-aside
    report.say(_describe(config, model, rt))
    t0, tokens_seen, first_step, train_loss = time.perf_counter(), 0, step, float("nan")
    budget = _Budget(config.max_minutes * 60.0, first_step, rt.device)
    report.start(step, config.max_steps)
    while step < config.max_steps and not budget.spent():
        lr = lr_at(step, config)
        set_lr(optimizer, lr)
        if config.eval_every and step % config.eval_every == 0 and step > 0:
            last = run_eval(model, eval_data, config, rt)
            log.log(step, "eval", **last)
            report.say(f"step {step} held-out: loss {last['loss']:.4f} | bpb {last['bpb']:.4f}")
        # the global batch of this step: every rank reads its slices, all agree on the loss-token count
        first = step * global_batch
        batches = [train_data.batch(first + (m * rt.world + rt.rank) * micro, micro).to(rt.device)
                   for m in range(accum)]
        loss_sum, n_loss, grad_norm = _train_step(model, optimizer, batches, config, rt)
        step += 1
        tokens_seen += global_batch * config.seq_len
        config = _fit_budget(budget, config, step, report)
        elapsed = time.perf_counter() - t0
        logged = step % config.log_every == 0 or step in (first_step + 1, config.max_steps) or budget.spent()
        if logged:  # the first step too: its line gives the ETA at once
            train_loss = _all_reduce([loss_sum], rt.device)[0] / max(n_loss, 1.0)
            log.log(step, "train", loss=train_loss, lr=lr, grad_norm=float(_full(grad_norm)),
                    tokens_per_s=tokens_seen / elapsed, elapsed_s=elapsed)
        report.step(step, config.max_steps, tokens_seen / elapsed, *((train_loss, lr) if logged else ()))
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(config.checkpoint_dir, step, model, optimizer,
                            {"samples_seen": step * global_batch, "config": config.to_dict()},
                            keep=config.keep_checkpoints)
    report.stop()
    speed = throughput(model, config, step - first_step, tokens_seen, time.perf_counter() - t0)
    report.say(f"held-out evaluation: {min(config.eval_batches * micro * rt.world, eval_data.n_windows)} windows")
    last = run_eval(model, eval_data, config, rt)
    final = {**last, "train_loss": train_loss, **speed, **finish(model, tokenizer, eval_data, config, rt, report)}
    log.log(step, "final", **final)
    log.close()
    return final


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list, config: TrainConfig,
                rt: Runtime) -> tuple[float, float, torch.Tensor]:
    """Forward and backward over this rank's micro-batches, clip, update; (summed nll, loss tokens, grad norm)."""
    n_loss = _all_reduce([float(sum(int(b.mask.sum()) for b in batches))], rt.device)[0]
    loss_sum = 0.0
    for m, batch in enumerate(batches):
        with no_sync(model, skip=m < len(batches) - 1), _autocast(config, rt.device):
            nll = (token_nll(model, batch.inputs, batch.targets) * batch.mask).sum()
        # gradients are averaged over ranks by DDP / FSDP: scale back up to a global token mean
        (nll * rt.world / max(n_loss, 1.0)).backward()
        loss_sum += float(nll.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_loss, grad_norm


def _resume(config: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, report: Reporter) -> int:
    """The step to start from: the latest checkpoint's (loaded into model and optimizer) or 0.

    Without ``resume``, an earlier run's checkpoints are moved aside first (see `set_aside`).
    """
    if not config.resume:
        if (moved := set_aside(config.checkpoint_dir)) is not None:
            report.say(f"not resuming: moved the earlier checkpoints in {config.checkpoint_dir} to {moved}")
            earlier_log = Path(config.out_dir) / "log.jsonl"
            if earlier_log.exists() and (not dist.is_initialized() or dist.get_rank() == 0):  # its steps are theirs
                earlier_log.replace(moved / "log.jsonl")
        return 0
    checkpoint = latest_checkpoint(config.checkpoint_dir, report.say)
    if checkpoint is None:
        return 0
    step = load_checkpoint(checkpoint, model, optimizer)["step"]
    report.say(f"resuming from {checkpoint} (step {step})")
    return step


def _describe(config: TrainConfig, model: torch.nn.Module, rt: Runtime) -> str:
    """One line: what is trained, where, and how much."""
    params = sum(p.numel() for p in model.parameters())
    name = config.init_from or config.model
    if config.lora_rank:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targets = " ".join(config.lora_targets)
        name += f" with LoRA rank {config.lora_rank} on {targets} ({trainable / 1e6:.2f}M trainable)"
    batch = config.micro_batch_size * config.grad_accum * rt.world
    processes = f" x {rt.world} processes" if rt.world > 1 else ""
    return (f"training {name} ({params / 1e6:.2f}M parameters) on {rt.device.type}{processes}, {config.dtype}: "
            f"{config.max_steps} steps of {batch} x {config.seq_len} tokens (micro-batch {config.micro_batch_size}, "
            f"grad_accum {config.grad_accum}), log every {config.log_every} steps to {config.out_dir}/log.jsonl")


def _fit_budget(budget: _Budget, config: TrainConfig, step: int, report: Reporter) -> TrainConfig:
    """`_Budget.fit`, saying when the time budget lowers max_steps."""
    fitted = budget.fit(config, step)
    if fitted.max_steps != config.max_steps:
        report.say(f"time budget {config.max_minutes:g} min: max_steps {config.max_steps} -> {fitted.max_steps}")
    return fitted


class _Budget:
    """The wall-clock budget of the steps: when it is spent, and how many steps fit into it.

    Under several processes both answers are agreed over ranks (the slowest rank decides), so every
    rank runs the same steps.
    """

    def __init__(self, seconds: float, first_step: int, device: torch.device, skip: int = 5, probe: int = 20):
        self.seconds, self.first, self.device, self.skip, self.probe = seconds, first_step, device, skip, probe
        self.start, self.t_probe = time.perf_counter(), 0.0

    def _agreed(self, value: float, op) -> float:
        if not dist.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t)

    def spent(self) -> bool:
        if not self.seconds:
            return False
        return self._agreed(time.perf_counter() - self.start, dist.ReduceOp.MAX) >= self.seconds

    def fit(self, config: TrainConfig, step: int) -> TrainConfig:
        """``config`` with max_steps lowered to what fits, once, ``skip + probe`` steps in."""
        if not self.seconds:
            return config
        done, now = step - self.first, time.perf_counter()
        if done == self.skip:
            self.t_probe = now
        if done != self.skip + self.probe:
            return config
        per_step = self._agreed((now - self.t_probe) / self.probe, dist.ReduceOp.MAX)
        fit = step + int((self.seconds - (now - self.start)) / per_step)
        return dataclasses.replace(config, max_steps=max(step, min(config.max_steps, fit)))


def throughput(model: torch.nn.Module, config: TrainConfig, steps: int, tokens: int, seconds: float) -> dict:
    """Steps, tokens and speed of this process's steps; model FLOPs as (4 N + 2 N_trainable) · tokens/s.

    Per token: forward 2N, backward 2N for the activations' gradients and 2 N_trainable for the weights'
    (6N in full training; frozen LoRA bases skip their weight gradients). Attention's score FLOPs are
    left out, small at these windows; MFU divides by ``peak_tflops`` when given.
    """
    params = sum(p.numel() for p in model.parameters())  # FSDP's DTensors count their global shape
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens_per_s = tokens / max(seconds, 1e-9)
    out = {"steps": steps, "tokens": tokens, "train_s": seconds, "tokens_per_s": tokens_per_s,
           "params": params, "model_tflops": (4 * params + 2 * trainable) * tokens_per_s / 1e12}
    if config.peak_tflops:
        out["mfu"] = out["model_tflops"] / config.peak_tflops
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP's gradient norm), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_eval(model: torch.nn.Module, data: PackedData, config: TrainConfig, rt: Runtime) -> dict:
    """Held-out loss and bits per byte over ``eval_batches`` micro-batches per rank, reduced over ranks."""
    model.eval()
    n = min(config.eval_batches * config.micro_batch_size * rt.world, data.n_windows)
    per_rank = -(-n // rt.world)
    mine = range(rt.rank * per_rank, min((rt.rank + 1) * per_rank, n))
    batches = [data.batch(i, min(config.micro_batch_size, mine.stop - i)).to(rt.device)
               for i in range(mine.start, mine.stop, config.micro_batch_size)]
    totals = eval_loss(model, batches, data.token_bytes, _autocast(config, rt.device))
    if not batches and dist.is_initialized() and config.parallel == "fsdp":
        raise ValueError("too few held-out windows to give every rank one (FSDP needs all ranks in every forward)")
    reduced = _all_reduce(list(totals.values()), rt.device)
    model.train()
    return summarize(dict(zip(totals, reduced, strict=True)))


def finish(model: torch.nn.Module, tokenizer, eval_data: PackedData, config: TrainConfig, rt: Runtime,
           report: Reporter | None = None) -> dict:
    """Writes the released-format model on rank 0 (and scores greedy exact match if asked)."""
    report = report or Reporter()
    state = full_model_state(model)  # collective under FSDP
    out: dict = {}
    if rt.is_main:
        plain = save_result(state, model_config(model), config, rt.device, report)
        source = Path(config.tokenizer or config.init_from)
        for name in TOKENIZER_FILES:
            if (source / name).exists():
                shutil.copyfile(source / name, config.model_dir / name)
        if config.generate_eval:  # scores the weights as saved (save_dtype), the way they will be used
            examples = _held_out_chats(config)[: config.generate_eval]
            report.say(f"greedy exact match on {len(examples)} held-out examples "
                       f"(up to {config.max_new_tokens} new tokens each)")
            with _autocast(config, rt.device):
                out = exact_match(plain, tokenizer, examples, max_new_tokens=config.max_new_tokens)
    if dist.is_initialized():
        dist.barrier()
    return out


def save_result(state: dict, model_config, config: TrainConfig, device: torch.device, report: Reporter) -> SambaY:
    """Writes the trained weights (released format, ``save_dtype``) or, for a LoRA run, the adapter (PEFT's
    format, fp32), to ``config.model_dir``; returns a plain model of the result (adapters merged) on ``device``."""
    plain = SambaY(model_config, backend="auto")
    if config.lora_rank:
        from sambay.lora import apply_lora, merge_lora, save_adapter
        from sambay.quant import apply_quantized_layers
        from sambay.train.setup import base_quant_spec

        spec = base_quant_spec(config)
        if spec is not None:  # QLoRA: the trained model's int8 / int4 base, so that `state` fits it
            apply_quantized_layers(plain, spec)
        apply_lora(plain, config.lora_targets, rank=config.lora_rank, alpha=config.lora_alpha or None)
        plain.load_state_dict(state)
        report.say(f"writing the LoRA adapter to {config.model_dir} (PEFT format)")
        save_adapter(plain, config.model_dir, base_model=config.init_from or config.model)
        return (plain if spec is not None else merge_lora(plain)).to(device).eval()  # a quantised base: unmerged
    plain.load_state_dict(state)
    plain.to(device).eval()
    report.say(f"writing the model to {config.model_dir} ({config.save_dtype})")
    dtype = torch.bfloat16 if config.save_dtype == "bfloat16" else torch.float32
    save_model(plain.to_dtype(dtype), config.model_dir)  # saved first: a failing evaluation loses nothing
    return plain


def model_config(model: torch.nn.Module):
    """The SambaYConfig of a possibly wrapped model."""
    return getattr(model, "module", model).config


def _held_out_chats(config: TrainConfig) -> list[dict]:
    """Chat examples of the eval files, in file order."""
    examples = []
    for path in config.eval_files:
        with open(path, encoding="utf-8") as f:
            examples += [json.loads(line) for line in f if line.strip()]
    return [e for e in examples if "messages" in e]
