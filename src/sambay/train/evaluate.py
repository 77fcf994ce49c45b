"""Evaluation: held-out loss and bits per byte, and greedy exact-match accuracy on chat problems.

Bits per byte (nanochat's metric, comparable across tokenizers) is the summed next-token loss in
bits over the summed UTF-8 bytes of the target tokens; markers count zero bytes and are left out.

`greedy_generate` runs the prompts through the engine core (`sambay.generate.Engine`), the one
generation loop of the codebase. `exact_match` asks each held-out question, takes the text after
`</think>`, and compares it with the reference answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sambay.model.sambay import SambaY
from sambay.text.reasoning import split_reasoning
from sambay.tokenizer import Tokenizer


def token_nll(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood in fp32: inputs, targets (b, t) -> (b, t). The model computes it from
    its hidden states piece by piece (`sambay.model.loss.head_nll`): a long sequence's logits are never
    held whole."""
    return model(inputs, targets=targets)


@torch.no_grad()
def eval_loss(model: nn.Module, batches, token_bytes: Tensor, autocast) -> dict[str, float]:
    """Summed loss, token and byte counts over ``batches`` (this rank's share; the caller reduces).

    Returns:
        {"nll": summed nats, "tokens": masked targets, "nll_text": nats on tokens with bytes, "bytes": bytes}.
    """
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in batches:
        with autocast:
            nll = token_nll(model, batch.inputs, batch.targets).double()
        mask = batch.mask
        nbytes = token_bytes.to(batch.targets.device)[batch.targets] * mask
        totals += torch.stack([(nll * mask).sum(), mask.sum(), (nll * (nbytes > 0)).sum(), nbytes.sum()]).cpu()
    return dict(zip(("nll", "tokens", "nll_text", "bytes"), totals.tolist(), strict=True))


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Mean loss and bits per byte from summed totals."""
    loss = totals["nll"] / max(totals["tokens"], 1)
    bpb = totals["nll_text"] / math.log(2) / max(totals["bytes"], 1)
    return {"loss": loss, "bpb": bpb}


def greedy_generate(
    model: SambaY, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` through the engine core, each cut at its first stop id (excluded).

    Args:
        model: a plain SambaY (not wrapped).
        prompts: token ids per row, of any lengths.
        max_new_tokens: generation budget per row.
        stop_ids: ids that end a row.

    Returns:
        Generated ids per row.
    """
    from sambay.generate import Engine, SamplingParams

    was_training = model.training
    model.eval()
    try:
        params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_ids))
        results = Engine(model, cuda_graphs=False).generate(prompts, params)
    finally:
        model.train(was_training)
    stops = set(stop_ids)
    return [[t for t in samples[0].token_ids if t not in stops] for samples in results]


def exact_match(
    model: SambaY, tokenizer: Tokenizer, examples: Sequence[dict], *, max_new_tokens: int = 512,
    batch_size: int = 128,
) -> dict[str, float]:
    """Accuracy of greedy answers on chat examples whose last message is the reference reply.

    Args:
        model: a plain SambaY.
        tokenizer: with the chat template.
        examples: ``{"messages": [..., {"role": "assistant", "content": ref}]}``; the expected answer is
            ``example["answer"]`` when present, else the reference's text after `</think>`.
        max_new_tokens: generation budget.
        batch_size: rows per generation batch.

    Returns:
        {"accuracy": fraction correct, "n": number of examples}, plus ``"accuracy/<task>"`` and
        ``"n/<task>"`` per value of the examples' optional ``"task"`` field.
    """
    stop_ids = tokenizer.stop_token_ids()
    correct, by_task = 0, {}
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        prompts = [tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True) for e in chunk]
        outputs = greedy_generate(model, prompts, max_new_tokens, stop_ids)
        for example, ids in zip(chunk, outputs, strict=True):
            expected = example.get("answer") or split_reasoning(example["messages"][-1]["content"]).content
            answer = split_reasoning(tokenizer.decode(ids, skip_special_tokens=True)).content
            right = answer.strip() == str(expected).strip()
            correct += right
            if "task" in example:
                by_task.setdefault(example["task"], []).append(right)
    out = {"accuracy": correct / max(len(examples), 1), "n": len(examples)}
    for task, results in sorted(by_task.items()):
        out |= {f"accuracy/{task}": sum(results) / len(results), f"n/{task}": len(results)}
    return out
