"""LoRA fine-tuning end to end: `sambay train --lora-rank`, the PEFT adapter it writes, resume, `sambay merge`,
and `sambay generate --lora` (the adapter applied == the merged model; bad adapters are one-line errors)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sambay import load_model, save_model
from sambay.cli.__main__ import main as sambay_main
from sambay.lora import apply_lora, attach_adapter, lora_layers, read_adapter, save_adapter
from sambay.train.config import load_train_config
from sambay.train.loop import TOKENIZER_FILES, train
from sambay.train.metrics import read_log
from tests.conftest import random_model, small_config
from tests.train.conftest import tiny_run


@pytest.fixture
def base(corpus, tmp_path) -> Path:
    """A released-format random model with the corpus tokenizer (vocab 300 < 320 rows)."""
    directory = tmp_path / "base"
    save_model(random_model(small_config(vocab_size=320), seed=3), directory)
    for name in TOKENIZER_FILES:
        (directory / name).write_bytes((corpus / "tokenizer" / name).read_bytes())
    return directory


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def test_lora_sft_writes_a_peft_adapter_that_reproduces_the_run(corpus, base, tmp_path):
    config = tiny_run(corpus, tmp_path / "run", init_from=str(base), tokenizer=None, lora_rank=4, lora_alpha=8.0,
                      lora_targets=["mamba", "gmu", "mlp.in_proj"], max_steps=3, lr=1e-2, checkpoint_every=3)
    final = train(config)
    adapter_dir = tmp_path / "run" / "adapter"
    assert config.model_dir == adapter_dir and final["loss"] > 0
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "tokenizer.json").is_file()
    adapter = read_adapter(adapter_dir)
    assert {layer.A.shape[0] for layer in adapter.layers.values()} == {4}
    assert {name.rsplit(".", 1)[1] for name in adapter.layers} == {"in_proj", "x_proj", "dt_proj", "out_proj", "fc1"}
    # the base is untouched by training: the checkpoint's base weights are the released ones
    state = load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors")
    original = load_model(base, progress=False, backend="reference")
    assert torch.equal(state["self_decoder.layers.0.mixer.in_proj.base.weight"],
                       original.self_decoder.layers[0].mixer.in_proj.weight)
    # the adapter applied to the base gives the trained model: its B moved off zero
    tokens = torch.randint(0, 300, (2, 12))
    before = _logits(original, tokens)
    attach_adapter(original, adapter)
    assert all(torch.count_nonzero(layer.lora_B) for layer in lora_layers(original).values())
    assert (_logits(original, tokens) - before).abs().max() > 1e-4


def test_lora_run_resumes_from_its_checkpoint(corpus, base, tmp_path):
    fields = dict(init_from=str(base), tokenizer=None, lora_rank=2, lora_targets=["attention"], checkpoint_every=2)
    train(tiny_run(corpus, tmp_path, max_steps=2, **fields))
    train(tiny_run(corpus, tmp_path, max_steps=4, **fields))
    steps = read_log(tmp_path / "log.jsonl")
    assert set(steps) == {1, 2, 3, 4}
    assert read_adapter(tmp_path / "adapter").layers


def test_lora_fields_are_checked():
    with pytest.raises(ValueError, match=r"unknown LoRA target 'mamba\.A_log'"):
        load_train_config(None, {"lora_rank": 4, "lora_targets": ["mamba.A_log"]})
    with pytest.raises(ValueError, match="objective must be 'lm' or 'dpo'"):
        load_train_config(None, {"objective": "ppo"})


@pytest.fixture
def adapter(base, tmp_path) -> Path:
    """An adapter on every target of ``base`` with non-zero B."""
    model = load_model(base, progress=False, backend="reference")
    apply_lora(model, rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.3, generator=g)
    return save_adapter(model, tmp_path / "adapter")


def _generate(capsys, *args) -> dict:
    code = sambay_main(["generate", "--raw", "--json", "--temperature", "0", "--max-new-tokens", "8", "--device",
                        "cpu", *args, "What is 12+7?"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def test_generate_with_lora_equals_the_merged_model(base, adapter, tmp_path, capsys):
    assert sambay_main(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    assert "merged 38 adapted layers" in capsys.readouterr().out
    merged = load_model(tmp_path / "merged", progress=False, backend="reference")
    unmerged = load_model(base, progress=False, backend="reference")
    attach_adapter(unmerged, read_adapter(adapter))
    tokens = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(_logits(merged, tokens), _logits(unmerged, tokens), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with_lora = _generate(capsys, "--model", str(base), "--lora", str(adapter))
    assert with_lora["choices"] == _generate(capsys, "--model", str(tmp_path / "merged"))["choices"]
    assert with_lora["choices"] != _generate(capsys, "--model", str(base))["choices"]


def test_chat_with_lora_replies_as_the_merged_model(base, adapter, tmp_path, capsys, monkeypatch):
    assert sambay_main(["merge", str(base), str(adapter), str(tmp_path / "merged"), "--dtype", "float32"]) == 0

    def reply(*args) -> str:
        capsys.readouterr()
        monkeypatch.setattr("sys.stdin", io.StringIO("What is 12+7?\n"))
        assert sambay_main(["chat", "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu", *args]) == 0
        return re.sub(r"\(\d+ tokens, .*\)", "", capsys.readouterr().out)  # without the timing line

    with_lora = reply("--model", str(base), "--lora", str(adapter))
    assert with_lora == reply("--model", str(tmp_path / "merged")) != reply("--model", str(base))


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_adapter_is_a_one_line_error(command, base, adapter, capsys):
    (adapter / "adapter_config.json").write_text(json.dumps({**json.loads((adapter / "adapter_config.json")
                                                                          .read_text()), "r": 16}))
    args = [command, "--model", str(base), "--lora", str(adapter), "--device", "cpu"]
    assert sambay_main(args + (["hi"] if command == "generate" else [])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has rank 4 but adapter_config.json says r=16" in err, err


def test_merge_refuses_to_overwrite_the_base(base, adapter, capsys):
    with pytest.raises(SystemExit) as info:
        sambay_main(["merge", str(base), str(adapter), str(base)])
    assert info.value.code == 2 and "OUT must differ from BASE" in capsys.readouterr().err
