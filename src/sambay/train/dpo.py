"""Direct Preference Optimization (Rafailov et al., arXiv 2305.18290, eq. 7), full or LoRA, on one process.

    r_c = β (log π(y_c | x) − log π_ref(y_c | x))        implicit reward of the chosen reply
    r_r = β (log π(y_r | x) − log π_ref(y_r | x))        … and of the rejected one
    loss = −log σ(r_c − r_r) + α · nll_c                 averaged over the pairs of a step

nll_c is the chosen reply's mean per-token negative log-likelihood and α ``dpo_sft_weight`` (0 by default:
plain DPO). With α > 0 this is DPO with an SFT term on the chosen replies (RPO, Pang et al., arXiv
2404.19733): the term keeps the chosen reply likely in absolute terms, where plain DPO may lower both
replies' likelihood as long as their difference grows, the failure behind a model that drifts past the
behaviour it was shown (docs/benchmarks.md, fine-tuning, DPO).

log π(y | x) sums the log-probabilities of the reply's tokens (`sambay.train.preference` masks). The
reference π_ref is the model as training starts (with LoRA: the base, since every B starts at zero), so
its log-probabilities are computed once, before the first step, for every pair, and stored in
``out_dir/dpo_reference.safetensors`` (reused while the data, the starting point and the dtype are the
same): no second model is held in memory and none is run during training. Logged per step and at the
end: the loss, the mean rewards of the chosen and rejected replies, their margin r_c − r_r, the
accuracy (the share of pairs with r_c > r_r) and nll_c. The final evaluation runs over the held-out pairs of
``eval_files`` or, without them, up to ``eval_batches`` micro-batches of training pairs.

The loop is `sambay.train.loop`'s with pairs for windows: a global batch of ``micro_batch_size ·
grad_accum`` pairs per step, in a seeded permutation per epoch; the lr schedule, clipping, checkpoints
(resume included), the time budget and the final save (weights, or the PEFT adapter) are shared. It runs
on one process (one GPU or the CPU); the micro-batch is not fitted to the CPU's memory.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sambay.train.config import TrainConfig
from sambay.train.evaluate import token_nll
from sambay.train.loop import _autocast, _Budget, _fit_budget, _resume, finish, throughput
from sambay.train.metrics import MetricLogger
from sambay.train.optim import build_optimizer, lr_at, set_lr
from sambay.train.preference import PreferencePair, collate, read_pairs
from sambay.train.progress import Reporter
from sambay.train.setup import build_model, build_tokenizer, parallelize, resolve_dtype, setup_distributed
from sambay.train.state import save_checkpoint

REFERENCE_FILE = "dpo_reference.safetensors"
METRICS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "chosen_nll")


def sequence_logps(model: nn.Module, inputs: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probability of the masked targets of each row: (rows, t) → (rows,) fp32."""
    return -(token_nll(model, inputs, targets) * mask).sum(-1)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO loss and implicit rewards.

    Args:
        policy, reference: (m, 2) log-probabilities of the (chosen, rejected) replies.
        beta: β.

    Returns:
        loss (m,), reward of the chosen (m,) and of the rejected reply (m,).
    """
    rewards = beta * (policy - reference)  # (m, 2)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards[:, 0], rewards[:, 1]


def _pair_logps(model: nn.Module, pairs: list[PreferencePair], device: torch.device) -> tuple[Tensor, Tensor]:
    """(m, 2) log-probabilities of the chosen and rejected replies of ``pairs``, in one forward, and (m, 2)
    their token counts."""
    batch = collate(pairs).to(device)
    logps = sequence_logps(model, batch.inputs, batch.targets, batch.mask).view(2, -1).T
    return logps, batch.mask.sum(-1).view(2, -1).T


def pair_loss(policy: Tensor, tokens: Tensor, reference: Tensor, config: TrainConfig) -> tuple[Tensor, ...]:
    """Per-pair (loss, chosen reward, rejected reward, chosen nll): DPO's loss plus ``dpo_sft_weight`` times
    the chosen reply's mean per-token NLL (module docstring)."""
    loss, chosen, rejected = dpo_loss(policy, reference, config.dpo_beta)
    nll = -policy[:, 0] / tokens[:, 0].clamp_min(1)
    return loss + config.dpo_sft_weight * nll, chosen, rejected, nll


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[PreferencePair], micro: int, device: torch.device,
                    autocast) -> Tensor:
    """(n, 2) fp32 log-probabilities of every pair's replies under ``model`` as it is now."""
    was_training = model.training
    model.eval()
    out = []
    for first in range(0, len(pairs), micro):
        with autocast:
            out.append(_pair_logps(model, pairs[first : first + micro], device)[0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _base_quantization(config: TrainConfig) -> list | None:
    """The frozen base's quantisation (bits, group size), which changes the reference log-probabilities."""
    from sambay.train.setup import base_quant_spec

    spec = base_quant_spec(config)
    return None if spec is None else [spec.bits, spec.group_size, getattr(spec, "input_scale", False)]


def stored_reference(model: nn.Module, pairs: dict[str, list[PreferencePair]], config: TrainConfig,
                     device: torch.device, report: Reporter) -> dict[str, Tensor]:
    """{split: (n, 2) reference log-probabilities}: read from ``out_dir`` when computed for the same
    inputs, else computed now (before any update) and stored there."""
    file = Path(config.out_dir) / REFERENCE_FILE
    stats = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns)
             for f in [*config.train_files, *config.eval_files]]
    fingerprint = json.dumps({"files": stats, "init_from": config.init_from, "model": config.model,
                              "seed": config.seed, "seq_len": config.seq_len, "dtype": config.dtype,
                              "lora": config.lora_rank > 0, "pairs": {k: len(v) for k, v in pairs.items()},
                              "base": _base_quantization(config)})
    if file.is_file():
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                report.say(f"dpo: reusing the reference log-probabilities in {file}")
                return load_file(file)
    n = sum(len(v) for v in pairs.values())
    report.say(f"dpo: reference log-probabilities of {n} pairs (once, before training)")
    autocast = _autocast(config, device)
    logps = {k: reference_logps(model, v, config.micro_batch_size, device, autocast) for k, v in pairs.items() if v}
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(logps, file.with_name(f".{file.name}.tmp"), metadata={"fingerprint": fingerprint})
    os.replace(file.with_name(f".{file.name}.tmp"), file)
    return logps


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_pairs(step: int, n: int, per_step: int, seed: int) -> list[int]:
    """Indices of the pairs of optimiser step ``step``: positions [step · per_step, …) of the data order."""
    positions = (divmod(i, n) for i in range(step * per_step, (step + 1) * per_step))
    return [int(_permutation(n, seed, epoch)[pos]) for epoch, pos in positions]


def dpo_step(model: nn.Module, optimizer: torch.optim.Optimizer, pairs: list[PreferencePair], reference: Tensor,
             config: TrainConfig, device: torch.device) -> dict[str, float]:
    """One optimiser step over ``pairs`` (split into micro-batches); returns the step's mean metrics."""
    totals = torch.zeros(len(METRICS), dtype=torch.float64)
    for first in range(0, len(pairs), config.micro_batch_size):
        chunk = pairs[first : first + config.micro_batch_size]
        with _autocast(config, device):
            policy, tokens = _pair_logps(model, chunk, device)
        parts = pair_loss(policy.float(), tokens, reference[first : first + len(chunk)].to(device), config)
        (parts[0].sum() / len(pairs)).backward()
        totals += _sums(*parts)
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _means(totals, len(pairs))


def _sums(loss: Tensor, chosen: Tensor, rejected: Tensor, nll: Tensor) -> Tensor:
    margin = (chosen - rejected).detach()
    parts = (loss.detach().sum(), chosen.detach().sum(), rejected.detach().sum(), margin.sum(), (margin > 0).sum(),
             nll.detach().sum())
    return torch.stack([p.double().cpu() for p in parts])


def _means(totals: Tensor, n: int) -> dict[str, float]:
    return dict(zip(METRICS, (totals / max(n, 1)).tolist(), strict=True))


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: list[PreferencePair], reference: Tensor, config: TrainConfig,
                   device: torch.device) -> dict[str, float]:
    """Mean DPO metrics of ``model`` over ``pairs`` (no update)."""
    model.eval()
    totals = torch.zeros(len(METRICS), dtype=torch.float64)
    for first in range(0, len(pairs), config.micro_batch_size):
        chunk = pairs[first : first + config.micro_batch_size]
        with _autocast(config, device):
            policy, tokens = _pair_logps(model, chunk, device)
        totals += _sums(*pair_loss(policy.float(), tokens, reference[first : first + len(chunk)].to(device), config))
    model.train()
    return _means(totals, len(pairs))


def train_dpo(config: TrainConfig, reporter: Reporter | None = None) -> dict:
    """Runs (or resumes) one DPO run; returns the final metrics (see the module docstring)."""
    rt = setup_distributed(config)
    if rt.world > 1:
        raise ValueError("--objective dpo runs on one process (one GPU or the CPU); launch it without torchrun")
    report = reporter or Reporter()
    config = resolve_dtype(config, rt.device, report)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(config)
    splits = _read_splits(config, tokenizer, report)
    model = build_model(config, rt)
    reference = stored_reference(model, splits, config, rt.device, report)
    model = parallelize(model, config, rt)
    optimizer = build_optimizer(model, config)
    log = MetricLogger(config.out_dir, tensorboard=config.tensorboard)
    train_pairs, per_step = splits["train"], config.micro_batch_size * config.grad_accum
    step = first_step = _resume(config, model, optimizer, report)
    report.say(f"dpo: beta {config.dpo_beta}, {config.max_steps} steps of {per_step} pairs, "
               f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters")
    t0, tokens, budget = time.perf_counter(), 0, _Budget(config.max_minutes * 60.0, step, rt.device)
    report.start(step, config.max_steps)
    while step < config.max_steps and not budget.spent():
        lr = lr_at(step, config)
        set_lr(optimizer, lr)
        indices = step_pairs(step, len(train_pairs), per_step, config.seed)
        metrics = dpo_step(model, optimizer, [train_pairs[i] for i in indices], reference["train"][indices],
                           config, rt.device)
        step += 1
        tokens += sum(train_pairs[i].n_tokens for i in indices)
        config = _fit_budget(budget, config, step, report)
        logged = step % config.log_every == 0 or step in (first_step + 1, config.max_steps) or budget.spent()
        if logged:
            log.log(step, "train", **metrics, lr=lr, tokens_per_s=tokens / (time.perf_counter() - t0))
            report.say("dpo " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        report.step(step, config.max_steps, tokens / (time.perf_counter() - t0), *((metrics["loss"], lr) if logged
                                                                                  else ()))
        if config.eval_every and step % config.eval_every == 0 and splits["eval"]:
            log.log(step, "eval", **evaluate_pairs(model, splits["eval"], reference["eval"], config, rt.device))
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            save_checkpoint(config.checkpoint_dir, step, model, optimizer, {"config": config.to_dict()},
                            keep=config.keep_checkpoints)
    report.stop()
    speed = throughput(model, config, step - first_step, tokens, time.perf_counter() - t0)
    final = {**_final_eval(model, splits, reference, config, rt.device), **speed,
             **finish(model, tokenizer, None, config, rt, report)}
    log.log(step, "final", **final)
    log.close()
    return final


def _read_splits(config: TrainConfig, tokenizer, report: Reporter) -> dict[str, list[PreferencePair]]:
    splits = {}
    for split, files in (("train", config.train_files), ("eval", config.eval_files)):
        pairs, n_cut = read_pairs(files, tokenizer, config.seq_len + 1) if files else ([], 0)
        splits[split] = pairs
        if n_cut:
            report.say(f"dpo: {n_cut} of {len(pairs)} {split} pairs are longer than {config.seq_len + 1} tokens "
                       "and were cut at the end")
    report.say(f"dpo: {len(splits['train'])} training pairs, {len(splits['eval'])} held-out")
    return splits


def _final_eval(model: nn.Module, splits: dict, reference: dict, config: TrainConfig, device) -> dict[str, float]:
    """The metrics over the held-out pairs, or the first ``eval_batches`` micro-batches of training pairs."""
    if splits["eval"]:
        return {**evaluate_pairs(model, splits["eval"], reference["eval"], config, device), "evaluated_on": "eval"}
    n = min(config.eval_batches * config.micro_batch_size, len(splits["train"]))
    metrics = evaluate_pairs(model, splits["train"][:n], reference["train"][:n], config, device)
    return {**metrics, "evaluated_on": "train"}
