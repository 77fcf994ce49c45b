"""Preference pairs for DPO: JSONL ``{"prompt", "chosen", "rejected"}`` → token ids with reply-only masks.

Each line holds one pair. ``prompt`` is the user message (a string) or a conversation (a list of
``{"role", "content"}`` messages ending before the reply); ``chosen`` and ``rejected`` are the assistant's
reply (a string, ``<think>`` reasoning included if any) or a list of messages that continue the
conversation (TRL's conversational format). Both replies are rendered with the model's chat template
after the same prompt by `sambay.train.chat.encode_chat`, so the tokens whose log-probabilities DPO
compares are exactly the assistant tokens SFT would train on (the closing `<|end|>` included).

Sequences longer than ``max_tokens`` are cut at the end (the prompt is kept, the reply's tail dropped) and
counted; a pair whose replies are cut away entirely is an error, since it carries no preference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sambay.tokenizer import Tokenizer
from sambay.train.chat import encode_chat
from sambay.train.data import Batch


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred reply, as ids and 0/1 reply masks."""

    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _messages(value, role: str, where: str) -> list[dict]:
    """A string as one message of ``role``, or a list of messages as given."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise ValueError(f"{where}: expected a string or a list of {{role, content}} messages, got {type(value).__name__}")


def _encode(tokenizer: Tokenizer, prompt: list[dict], reply: list[dict], max_tokens: int, where: str
            ) -> tuple[list[int], list[int], bool]:
    """(ids, mask, cut): the conversation prompt + reply, mask on the reply's assistant tokens, cut to max_tokens."""
    ids, mask = encode_chat(tokenizer, [*prompt, *reply])
    cut = len(ids) > max_tokens
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask[1:]):  # position 0 is never a target
        raise ValueError(f"{where}: no reply token is left within {max_tokens} tokens; raise --seq-len")
    return ids, mask, cut


def read_pairs(files: Sequence[str], tokenizer: Tokenizer, max_tokens: int) -> tuple[list[PreferencePair], int]:
    """All pairs of ``files`` in order, and how many had a sequence cut to ``max_tokens``.

    Raises:
        ValueError: a line that is not a pair (naming the file and line), or no pairs at all.
    """
    pairs, n_cut = [], 0
    for path in files:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = json.loads(line)
            if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
                raise ValueError(f"{where}: a DPO line needs 'prompt', 'chosen' and 'rejected'")
            prompt = _messages(record["prompt"], "user", f"{where} prompt")
            c_ids, c_mask, c_cut = _encode(tokenizer, prompt, _messages(record["chosen"], "assistant", where),
                                           max_tokens, f"{where} chosen")
            r_ids, r_mask, r_cut = _encode(tokenizer, prompt, _messages(record["rejected"], "assistant", where),
                                           max_tokens, f"{where} rejected")
            pairs.append(PreferencePair(c_ids, c_mask, r_ids, r_mask))
            n_cut += c_cut or r_cut
    if not pairs:
        raise ValueError(f"no preference pairs in {', '.join(files)}")
    return pairs, n_cut


def collate(pairs: Sequence[PreferencePair], pad_id: int = 0) -> Batch:
    """m pairs → one batch of 2m right-padded rows: the m chosen sequences, then the m rejected ones.

    Right padding leaves every valid position's logits unchanged (the model is causal); the mask, which
    also covers the padding, keeps the padded targets out of every sum.
    """
    rows = [(p.chosen, p.chosen_mask) for p in pairs] + [(p.rejected, p.rejected_mask) for p in pairs]
    t = max(len(ids) for ids, _ in rows)
    data = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (2m, t)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, (ids, m) in enumerate(rows):
        data[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return Batch(data[:, :-1].contiguous(), data[:, 1:].contiguous(), mask[:, 1:].contiguous())
