"""DPO (`sambay.train.dpo`): the loss, reply-only masks of preference pairs, a step that moves the margin the right
way (LoRA and full), and a run that logs its metrics and computes the reference log-probabilities once."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from sambay.config import PRESETS
from sambay.model.sambay import SambaY
from sambay.tokenizer import load_tokenizer
from sambay.train.arithmetic import make_split
from sambay.train.dpo import (
    METRICS,
    REFERENCE_FILE,
    dpo_loss,
    dpo_step,
    evaluate_pairs,
    pair_loss,
    reference_logps,
)
from sambay.train.loop import train
from sambay.train.metrics import read_log
from sambay.train.optim import build_optimizer
from sambay.train.preference import collate, read_pairs
from sambay.train.progress import Reporter
from sambay.train.setup import add_lora
from tests.train.conftest import tiny_run


def _pair(example: dict) -> dict:
    """Short replies (the answer alone), so that tiny runs stay fast: a sentence is preferred to the bare number."""
    question, reply = (m["content"] for m in example["messages"])
    answer = reply.rpartition("\n")[2]
    return {"prompt": question, "chosen": f"The answer is {answer}.", "rejected": answer}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(_pair(e)) + "\n" for e in make_split(8, seed=5)))
    return path


def test_loss_at_the_reference_is_log_2():
    policy = torch.tensor([[-3.0, -5.0], [-1.0, -0.5]])
    loss, chosen, rejected = dpo_loss(policy, policy.clone(), beta=0.5)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert not chosen.any() and not rejected.any()
    loss, chosen, rejected = dpo_loss(policy + torch.tensor([1.0, -1.0]), policy, beta=0.5)
    torch.testing.assert_close(chosen - rejected, torch.ones(2))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(torch.ones(2)))


def test_the_sft_term_adds_the_chosen_replys_mean_token_nll():
    policy, reference = torch.tensor([[-6.0, -5.0], [-2.0, -0.5]]), torch.tensor([[-7.0, -5.0], [-2.0, -1.0]])
    tokens = torch.tensor([[3, 4], [4, 1]])
    plain = tiny_run(Path("unused"), Path("unused"), dpo_beta=0.5)
    rpo = tiny_run(Path("unused"), Path("unused"), dpo_beta=0.5, dpo_sft_weight=2.0)
    loss, _, _, nll = pair_loss(policy, tokens, reference, plain)
    torch.testing.assert_close(loss, dpo_loss(policy, reference, 0.5)[0])
    torch.testing.assert_close(nll, torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(pair_loss(policy, tokens, reference, rpo)[0], loss + 2.0 * nll)
    with pytest.raises(ValueError, match="dpo_sft_weight"):
        tiny_run(Path("unused"), Path("unused"), dpo_sft_weight=-1.0)


def test_pairs_mask_the_replies_only(corpus, pairs_file):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    pairs, n_cut = read_pairs([str(pairs_file)], tokenizer, 1000)
    record = json.loads(pairs_file.read_text().splitlines()[0])
    assert n_cut == 0 and len(pairs) == 8
    chosen = tokenizer.decode([t for t, m in zip(pairs[0].chosen, pairs[0].chosen_mask, strict=True) if m])
    assert chosen == record["chosen"] + "<|end|>"
    batch = collate(pairs[:3])
    assert batch.inputs.shape[0] == 6 and batch.mask[3:].sum() == sum(sum(p.rejected_mask[1:]) for p in pairs[:3])
    longest = max(len(p.chosen) for p in pairs)
    cut, n_cut = read_pairs([str(pairs_file)], tokenizer, longest - 1)
    assert n_cut == sum(len(p.chosen) == longest for p in pairs) and max(len(p.chosen) for p in cut) == longest - 1
    with pytest.raises(ValueError, match="no reply token is left within 5 tokens"):
        read_pairs([str(pairs_file)], tokenizer, 5)
    bad = pairs_file.with_name("bad.jsonl")
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: a DPO line needs 'prompt', 'chosen' and 'rejected'"):
        read_pairs([str(bad)], tokenizer, 100)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_step_moves_the_margin_the_right_way(corpus, pairs_file, lora_rank):
    tokenizer = load_tokenizer(corpus / "tokenizer")
    pairs, _ = read_pairs([str(pairs_file)], tokenizer, 128)
    config = tiny_run(corpus, Path("unused"), lora_rank=lora_rank, lr=1e-3 if lora_rank else 1e-4, grad_clip=0.0,
                      micro_batch_size=2, dpo_beta=0.1)
    model = SambaY(PRESETS["sambay-da-tiny"], backend="reference").init_weights(torch.Generator().manual_seed(0))
    if lora_rank:
        add_lora(model, config)
    reference = reference_logps(model, pairs, 2, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    before = evaluate_pairs(model, pairs, reference, config, torch.device("cpu"))
    assert before["margin"] == 0 and before["loss"] == pytest.approx(math.log(2))
    optimizer = build_optimizer(model, config)
    for _ in range(2):
        dpo_step(model, optimizer, pairs, reference, config, torch.device("cpu"))
    after = evaluate_pairs(model, pairs, reference, config, torch.device("cpu"))
    assert after["margin"] > 0 and after["accuracy"] > 0.5 and after["loss"] < math.log(2)
    assert after["reward_chosen"] > after["reward_rejected"]


def test_a_dpo_run_logs_its_metrics_and_computes_the_reference_once(corpus, pairs_file, tmp_path):
    config = tiny_run(corpus, tmp_path, objective="dpo", train_files=[str(pairs_file)], eval_files=[str(pairs_file)],
                      lora_rank=4, seq_len=64, micro_batch_size=2, grad_accum=2, max_steps=3, lr=1e-3,
                      eval_every=2, checkpoint_every=3)
    final = train(config)
    assert {*METRICS, "tokens_per_s"} <= set(final) and final["evaluated_on"] == "eval"
    logged = read_log(tmp_path / "log.jsonl")
    assert set(logged) == {1, 2, 3} and all(set(METRICS) <= set(r) for r in logged.values())
    assert set(read_log(tmp_path / "log.jsonl", "eval")) == {2}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and (tmp_path / REFERENCE_FILE).is_file()
    stream = io.StringIO()
    reporter = Reporter(Console(file=stream, width=200))
    resumed = {k: v for k, v in config.to_dict().items() if k != "out_dir"}
    train(tiny_run(corpus, tmp_path, **{**resumed, "max_steps": 4}), reporter)
    said = stream.getvalue()
    assert "reusing the reference log-probabilities" in said and "resuming from" in said, said
    assert set(read_log(tmp_path / "log.jsonl")) == {1, 2, 3, 4}


def test_the_reference_is_recomputed_for_another_base_quantisation(corpus, pairs_file, tmp_path):
    """The stored reference log-probabilities are those of the frozen base: a QLoRA base quantised otherwise
    (or a float one) computes them anew instead of reusing another base's."""
    from sambay.train.dpo import stored_reference

    tokenizer = load_tokenizer(corpus / "tokenizer")
    pairs = {"train": read_pairs([str(pairs_file)], tokenizer, 64)[0]}
    model = SambaY(PRESETS["sambay-da-tiny"], backend="reference").init_weights(torch.Generator().manual_seed(0))
    said = []

    class Say:
        def say(self, message):
            said.append(message)

    for quantize_base in (0, 8, 8, 4):
        config = tiny_run(corpus, tmp_path, objective="dpo", train_files=[str(pairs_file)], lora_rank=4,
                          seq_len=64, quantize_base=quantize_base, quantize_group_size=16)
        stored_reference(model, pairs, config, torch.device("cpu"), Say())
    assert ["reusing" in m for m in said] == [False, False, True, False], said
