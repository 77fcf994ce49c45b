"""Evaluation: held-out loss and bits per byte, and greedy exact-match accuracy on chat problems.

Bits per byte (nanochat's metric, comparable across tokenizers) is the summed next-token loss in
bits over the summed UTF-8 bytes of the target tokens; markers count zero bytes and are left out.

`greedy_generate` is a minimal batched greedy loop over the model's own cache: one prefill of the
right-padded prompts (``lengths`` keeps the padding out of every cache), then one token per step
for all rows. `exact_match` asks each held-out question, takes the text after `</think>`, and compares
it with the reference answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sambay.model.sambay import SambaY
from sambay.text.reasoning import split_reasoning
from sambay.tokenizer import Tokenizer


def token_nll(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood in fp32: inputs, targets (b, t) -> (b, t)."""
    logits = model(inputs)  # (b, t, vocab_size)
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return nll.view_as(targets)


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


@torch.no_grad()
def greedy_generate(
    model: SambaY, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuations of ``prompts``, each cut at its first stop id (excluded).

    Args:
        model: a plain SambaY (not wrapped).
        prompts: token ids per row, of any lengths.
        max_new_tokens: generation budget per row.
        stop_ids: ids that end a row.

    Returns:
        Generated ids per row.
    """
    b, device = len(prompts), model.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(b, int(lengths.max()), dtype=torch.long, device=device)  # (b, t) right-padded
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, device=device)
    cache = model.new_cache(batch_size=b, max_length=int(lengths.max()) + max_new_tokens)
    logits = model(tokens, cache, lengths=lengths)  # (b, 1, vocab_size)
    stops = torch.tensor(list(stop_ids), device=device)
    out = torch.zeros(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        next_token = logits[:, -1].argmax(-1, keepdim=True)  # (b, 1)
        out = torch.cat([out, next_token], dim=1)
        done |= torch.isin(next_token[:, 0], stops)
        if bool(done.all()):
            break
        logits = model(next_token, cache)
    result = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))
        result.append(row[:cut])
    return result


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
