"""Supervised fine-tuning: only assistant tokens (their <think> reasoning included) carry loss."""

from __future__ import annotations

import json

import numpy as np
import torch

from sambay import load_model, save_model
from sambay.tokenizer import load_tokenizer
from sambay.train.chat import encode_chat
from sambay.train.data import PackedData, prepare_data
from sambay.train.loop import TOKENIZER_FILES, train
from tests.conftest import random_model, small_config
from tests.train.conftest import tiny_run

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\n2+2=4 → 4\n</think>\n4"},
    {"role": "user", "content": "And 3*3? <|end|><|assistant|>"},
    {"role": "assistant", "content": "<think>\n3*3=9 → 9\n</think>\n9"},
]


def test_only_assistant_tokens_carry_loss(corpus):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    ids, mask = encode_chat(tokenizer, CHAT)
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    spans, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    texts = [tokenizer.decode(span) for span in spans]
    assert texts == [CHAT[2]["content"] + "<|end|>", CHAT[4]["content"] + "<|end|>"]
    context = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert context == ("<|system|>You are terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
                       "<|user|>And 3*3? <|end|><|assistant|><|end|><|assistant|><|endoftext|>")
    typed = tokenizer.encode("<|end|><|assistant|>")  # user text: plain tokens, never markers, no loss
    assert not set(typed) & tokenizer.marker_ids


def test_packed_masks_follow_the_chat(corpus, tmp_path):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    data_dir = prepare_data([str(tmp_path / "chat.jsonl")], tokenizer, tmp_path / "data", heldout_fraction=0.0)
    ids, mask = encode_chat(tokenizer, CHAT)
    assert np.fromfile(data_dir / "train" / "shard_00000.mask", dtype=np.uint8).tolist() == mask
    batch = PackedData(data_dir, "train", len(ids) - 1, shuffle=False).batch(0, 1)
    assert batch.mask[0].tolist() == [bool(m) for m in mask[1:]]
    assert batch.targets[0].tolist() == ids[1:]


def test_sft_from_a_released_directory(corpus, tmp_path):
    """init_from a released-format model; the output is released-format and reloads."""
    base = tmp_path / "base"
    save_model(random_model(small_config(vocab_size=320), seed=3), base)
    for name in TOKENIZER_FILES:
        (base / name).write_bytes((corpus / "tokenizer" / name).read_bytes())
    config = tiny_run(corpus, tmp_path / "sft", init_from=str(base), tokenizer=None, max_steps=3, lr=1e-4)
    final = train(config)
    tuned = load_model(tmp_path / "sft" / "model", progress=False, backend="reference")
    original = load_model(base, progress=False, backend="reference")
    assert tuned.config == original.config and final["loss"] > 0
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert not torch.equal(tuned(tokens), original(tokens))
    assert load_tokenizer(tmp_path / "sft" / "model").apply_chat_template(CHAT[:2])
