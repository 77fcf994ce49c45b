"""QLoRA end to end: `sambay train --init-from INT4_DIR --lora-rank R` (and ``--quantize-base``) writes a PEFT
adapter under the float checkpoint's names, which `sambay merge` folds into the float base (and refuses to
fold into the quantised one) and `sambay generate --lora` applies to either; full fine-tuning of a quantised
base is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sambay import load_model, save_model
from sambay.cli.__main__ import main as sambay_main
from sambay.lora import attach_adapter, lora_layers, read_adapter
from sambay.train.loop import TOKENIZER_FILES, train
from tests.conftest import random_model, small_config
from tests.train.conftest import tiny_run


@pytest.fixture
def bases(corpus, tmp_path) -> tuple[Path, Path]:
    """(a released-format random model with the corpus tokenizer, its int4 copy by `sambay quantize`)."""
    directory = tmp_path / "base"
    save_model(random_model(small_config(vocab_size=320), seed=3), directory)
    for name in TOKENIZER_FILES:
        (directory / name).write_bytes((corpus / "tokenizer" / name).read_bytes())
    quantized = tmp_path / "int4"
    assert sambay_main(["quantize", str(directory), str(quantized), "--bits", "4", "--group-size", "16"]) == 0
    return directory, quantized


def test_qlora_sft_on_an_int4_base_writes_an_adapter_for_the_float_base(corpus, bases, tmp_path, capsys):
    base, quantized = bases
    config = tiny_run(corpus, tmp_path / "run", init_from=str(quantized), tokenizer=None, lora_rank=4,
                      lora_alpha=8.0, max_steps=3, lr=1e-2, checkpoint_every=3)
    assert train(config)["loss"] > 0
    adapter_dir = tmp_path / "run" / "adapter"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    # the int weights as `sambay quantize` wrote them, bitwise, in the run's checkpoint
    state = load_file(tmp_path / "run" / "checkpoints" / "step_00000003" / "model.safetensors")
    written = load_file(quantized / "model.safetensors")
    assert torch.equal(state["self_decoder.layers.0.mixer.in_proj.base.qweight"],
                       written["model.layers.0.attn.in_proj.qweight"])
    adapter = read_adapter(adapter_dir)
    float_model = load_model(base, progress=False, backend="reference")
    attached = attach_adapter(float_model, adapter)
    assert len(attached) == len(adapter.layers) == 38
    assert all(torch.count_nonzero(layer.lora_B) for layer in lora_layers(float_model).values())
    capsys.readouterr()
    assert sambay_main(["merge", str(base), str(adapter_dir), str(tmp_path / "merged")]) == 0
    assert sambay_main(["merge", str(quantized), str(adapter_dir), str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "merging needs the float weights" in err, err
    for model in (quantized, base):
        assert sambay_main(["generate", "--raw", "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu",
                            "--model", str(model), "--lora", str(adapter_dir), "What is 1+1?"]) == 0


def test_quantize_base_trains_lora_on_a_base_quantised_on_load(corpus, bases, tmp_path):
    base, _ = bases
    config = tiny_run(corpus, tmp_path / "run", init_from=str(base), tokenizer=None, lora_rank=2,
                      lora_targets=["mlp"], quantize_base=8, quantize_group_size=16, max_steps=2)
    train(config)
    adapter = read_adapter(tmp_path / "run" / "adapter")
    assert {name.rsplit(".", 1)[1] for name in adapter.layers} == {"fc1", "fc2"}


def test_full_fine_tuning_of_a_quantized_base_is_a_one_line_error(corpus, bases, tmp_path, capsys):
    _, quantized = bases
    with pytest.raises(ValueError, match="is quantised"):
        tiny_run(corpus, tmp_path / "run", init_from=str(quantized), tokenizer=None)
    capsys.readouterr()
    assert sambay_main(["train", "--init-from", str(quantized), "--train-files", str(corpus / "train.jsonl"),
                        "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lora-rank R, QLoRA" in err, err
    assert not (tmp_path / "run").exists()

