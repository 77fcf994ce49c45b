"""Loss, perplexity and bits per byte of text, over a sliding window, batched.

Each document is scored on its own, after one `<|endoftext|>` (the separator the trainer puts between
documents), so every one of its tokens is predicted and its bits per byte count all of its UTF-8 bytes.
A document longer than the window is scored the way HF's "perplexity of fixed-length models" guide does
it: windows of ``window`` tokens start every ``stride`` tokens, and each scores only the tokens no earlier
window scored, so every token is predicted once, with at least ``window - stride`` tokens of context (all
of it in the first window). ``stride = window - 1`` is the cheapest; a smaller stride gives each token more
context at more cost.

    loss = summed next-token NLL (nats) / tokens       perplexity = exp(loss)
    bits per byte = summed NLL / ln 2 / UTF-8 bytes    (nanochat's tokenizer-independent metric)

`score` is the one scoring function: a batch of windows, right-padded (the model is causal, so padding
after a row's last token changes none of its logits), one forward without a cache, log-softmax in fp32 on
the scored positions only. The lm-evaluation-harness backend scores continuations with it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sambay.model.sambay import SambaY
from sambay.tokenizer import Tokenizer


@dataclass(frozen=True)
class Window:
    """Tokens to run and how many of the last ones to score (each predicted from the ones before it)."""

    tokens: Sequence[int]
    scored: int  # 1 <= scored <= len(tokens) - 1


@dataclass(frozen=True)
class Score:
    """The scored tokens of one window."""

    logprob: float  # summed log-probability (nats) of the scored tokens
    greedy: bool  # every scored token is the argmax of its logits


def sliding_windows(ids: Sequence[int], window: int, stride: int) -> Iterator[Window]:
    """Windows over ``ids`` that predict ids[1:] once each (module docstring); ids[0] is the context.

    Args:
        ids: the document's tokens after its prefix token (at least 2).
        window: tokens per window (>= 2).
        stride: start-to-start distance of windows, 1 <= stride < window.
    """
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got stride {stride}, window {window}")
    scored_to = 1  # ids[:scored_to] need no prediction (the prefix)
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        yield Window(ids[begin:end], end - scored_to)
        scored_to = end
        if end == len(ids):
            return


@torch.no_grad()
def score(model: SambaY, windows: Sequence[Window], batch_tokens: int = 16384,
          on_batch: Callable[[int], None] | None = None) -> list[Score]:
    """Log-probabilities of the scored tokens of each window, in batches of about ``batch_tokens`` tokens.

    Args:
        model: the language model (eval mode).
        windows: at most the model's ``max_seq_len`` + 1 tokens each (the last one is only a target).
        batch_tokens: rows x padded length per forward (a row longer than that runs alone).
        on_batch: called after each forward with the number of windows it scored (progress).

    Returns:
        One `Score` per window, in order.
    """
    out: list[Score | None] = [None] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    for batch in _batches(order, windows, batch_tokens):
        width = len(windows[batch[0]].tokens)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # (b, t), right-padded with id 0
        for row, i in enumerate(batch):
            tokens[row, : len(windows[i].tokens)] = torch.as_tensor(list(windows[i].tokens))
        logits = model(tokens[:, :-1].to(model.device))  # (b, t - 1, vocab): the last token predicts nothing
        for row, i in enumerate(batch):
            n, k = len(windows[i].tokens), windows[i].scored
            rows = logits[row, n - k - 1 : n - 1].float()  # (k, vocab): the logits that predict the scored tokens
            targets = tokens[row, n - k : n].to(rows.device)
            logprob = -F.cross_entropy(rows, targets, reduction="sum").item()
            out[i] = Score(logprob, bool((rows.argmax(-1) == targets).all()))
        if on_batch is not None:
            on_batch(len(batch))
    return out


def _batches(order: list[int], windows: Sequence[Window], batch_tokens: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for i in order:  # longest first: a batch's first row sets its width
        if batch and (len(batch) + 1) * len(windows[batch[0]].tokens) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def read_documents(path: str | Path) -> list[str]:
    """A .txt file is one document; a .jsonl file holds one ``{"text": ...}`` per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: each JSONL line needs a 'text' string")
                docs.append(record["text"])
    return docs


def perplexity(model: SambaY, tokenizer: Tokenizer, documents: Sequence[str], *, window: int,
               stride: int | None = None, batch_tokens: int = 16384,
               on_windows: Callable[[int], None] | None = None,
               on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte of ``documents`` (module docstring).

    Args:
        model: the language model (eval mode).
        tokenizer: its tokenizer; it must define `<|endoftext|>` (the eos token).
        documents: texts, each scored on its own; empty ones are skipped.
        window: tokens per window (the forward runs on all but the last), at most the model's ``max_seq_len``.
        stride: default ``window // 2``.
        batch_tokens: see `score`.
        on_windows: called once with the number of windows to score; on_batch: see `score` (progress).

    Returns:
        {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents", "window", "stride"}.
    """
    prefix = tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has no eos token to put before each document")
    if not 2 <= window <= model.config.max_seq_len:
        raise ValueError(f"window must be in [2, {model.config.max_seq_len}] (the model's max_seq_len), got {window}")
    stride = window // 2 if stride is None else stride
    windows, nbytes, tokens, docs = [], 0, 0, 0
    for text in documents:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        windows += sliding_windows([prefix, *ids], window, stride)
        nbytes, tokens, docs = nbytes + len(text.encode("utf-8")), tokens + len(ids), docs + 1
    if not tokens:
        raise ValueError("no text to score")
    if on_windows is not None:
        on_windows(len(windows))
    nll = -sum(s.logprob for s in score(model, windows, batch_tokens, on_batch))
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes, "documents": docs, "window": window, "stride": stride}
