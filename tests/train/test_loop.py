"""End-to-end runs of the trainer on the CPU: loss goes down, every architecture trains and exports."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from sambay import SambaY, load_model
from sambay.config import ARCHITECTURES, PRESETS
from sambay.tokenizer import load_tokenizer
from sambay.train.config import load_train_config
from sambay.train.loop import train
from sambay.train.metrics import read_log
from sambay.train.optim import lr_at
from tests.train.conftest import tiny_run


def test_loss_goes_down(corpus, tmp_path):
    config = tiny_run(corpus, tmp_path, max_steps=30, dtype="bfloat16", eval_every=10)
    final = train(config)
    losses = read_log(tmp_path / "log.jsonl")
    first, last = losses[1]["loss"], sum(losses[s]["loss"] for s in range(26, 31)) / 5
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f}"
    assert set(read_log(tmp_path / "log.jsonl", "eval")) == {10, 20}
    assert final["bpb"] > 0 and final["loss"] < first


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_and_exports(arch, corpus, tmp_path):
    """The released-format output reloads with `load_model` and gives the trainer's final logits."""
    config = tiny_run(corpus, tmp_path, model=f"{arch}-tiny", max_steps=2, checkpoint_every=2)
    train(config)
    trained = SambaY(PRESETS[f"{arch}-tiny"], backend="reference").eval()
    trained.load_state_dict(load_file(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    loaded = load_model(tmp_path / "model", progress=False, backend="reference")
    assert loaded.config == trained.config
    tokens = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), trained(tokens), rtol=0, atol=0)
    assert load_tokenizer(tmp_path / "model").vocab_size == load_tokenizer(corpus / "tokenizer").vocab_size


def test_toml_config_and_overrides(tmp_path):
    (tmp_path / "run.toml").write_text('model = "samba-tiny"\ntrain_files = ["a.txt"]\nlr = 1e-3\nmax_steps = 5\n')
    config = load_train_config(tmp_path / "run.toml", {"max_steps": 7, "compile": True})
    assert (config.model, config.lr, config.max_steps, config.compile) == ("samba-tiny", 1e-3, 7, True)
    assert config.train_files == [str((tmp_path / "a.txt").resolve())]
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        load_train_config(tmp_path / "run.toml", {"learning_rate": 1.0})
    with pytest.raises(ValueError, match="must be int"):
        load_train_config(None, {"max_steps": "many"})


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules(schedule):
    config = load_train_config(None, dict(schedule=schedule, lr=1.0, min_lr_ratio=0.1, warmup_steps=10,
                                          max_steps=100, decay_fraction=0.2))
    lrs = [lr_at(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(lrs[10:]))
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[99] == pytest.approx(0.1 + 0.9 / 20)
    if schedule == "cosine":
        assert lrs[99] == pytest.approx(0.1, abs=1e-3)


def test_activation_checkpointing_changes_nothing_but_memory(corpus, tmp_path):
    train(tiny_run(corpus, tmp_path / "plain", max_steps=3))
    train(tiny_run(corpus, tmp_path / "ac", max_steps=3, activation_checkpointing=True))
    plain, ac = read_log(tmp_path / "plain" / "log.jsonl"), read_log(tmp_path / "ac" / "log.jsonl")
    for step in (1, 2, 3):
        assert ac[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-6)
    assert load_model(tmp_path / "ac" / "model", progress=False).config == PRESETS["sambay-da-tiny"]


def test_triton_training_scan_follows_the_reference(corpus, tmp_path, monkeypatch):
    """scan_kernel="triton" (the trainable Triton scan; here under the interpreter) trains as the reference does."""
    pytest.importorskip("triton")
    from sambay.ops.triton import selective_scan_train

    if not torch.cuda.is_available():  # one program per row: the interpreter's cost is per program and step
        monkeypatch.setattr(selective_scan_train, "BLOCK", 256)
        # and the sequential algorithm, whose few programs the interpreter runs 2.5x faster than the chunked
        # one's many (both are checked against the reference in tests/ops/test_selective_scan_train.py)
        monkeypatch.setattr(selective_scan_train, "ALGORITHM", "sequential")
    train(tiny_run(corpus, tmp_path / "ref", max_steps=2))
    train(tiny_run(corpus, tmp_path / "tri", max_steps=2, scan_kernel="triton"))
    ref, tri = read_log(tmp_path / "ref" / "log.jsonl"), read_log(tmp_path / "tri" / "log.jsonl")
    for step in (1, 2):
        assert tri[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
    with pytest.raises(ValueError, match="scan_kernel"):
        load_train_config(None, {"scan_kernel": "cuda"})


def test_flex_attention_kernel_is_refused_on_the_cpu(corpus, tmp_path):
    """FlexAttention has no CPU backward: asking for it there is a clear error before any step, not a crash
    in the first backward; a bad name is refused by the config."""
    with pytest.raises(ValueError, match="attention_kernel='flex' needs a CUDA device"):
        train(tiny_run(corpus, tmp_path / "flex", max_steps=1, attention_kernel="flex", device="cpu"))
    with pytest.raises(ValueError, match="attention_kernel"):
        load_train_config(None, {"attention_kernel": "sdpa"})


def test_adamw_is_fused_on_cuda_parameters_only():
    """The fused CUDA AdamW for plain CUDA parameters; the default path on the CPU (and for FSDP2 shards)."""
    from torch import nn

    from sambay.train.optim import build_optimizer

    config = load_train_config(None, {})
    assert not build_optimizer(nn.Linear(4, 3), config).defaults["fused"]
    if torch.cuda.is_available():
        assert build_optimizer(nn.Linear(4, 3).cuda(), config).defaults["fused"]
