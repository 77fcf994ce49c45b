"""LoRA adapters in PEFT's on-disk format: our files as PEFT documents them (and, where `peft` is installed, as
PEFT's own loader reads them), round trips, adapters written by PEFT, and one-line errors for bad files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sambay.config import LayerKind
from sambay.lora import (
    AdapterError,
    apply_lora,
    attach_adapter,
    hf_module_name,
    lora_layers,
    merge_adapter,
    read_adapter,
    save_adapter,
)
from sambay.lora.targets import linear_layers
from tests.conftest import random_model, small_config

# PEFT's documented layout: base_model.model.<module name of the base model>.lora_{A,B}.weight
PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.\d+\.(attn|mlp)\.\w+\.lora_[AB]\.weight")


def _adapted(targets=("all",), rank=4, alpha=8.0, seed=1):
    model = random_model(small_config())
    apply_lora(model, targets, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, 0.2, generator=g)
    return model


def _tokens():
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def test_saved_files_follow_peft_format_under_checkpoint_names(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path, base_model="base-dir")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["bias"], config["use_rslora"]) == (4, 8.0, "none", False)
    assert config["target_modules"] == ["Wqkv", "dt_proj", "fc1", "fc2", "in_proj", "out_proj", "x_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all(PEFT_KEY.fullmatch(key) for key in tensors), [k for k in tensors if not PEFT_KEY.fullmatch(k)]
    assert len(tensors) == 2 * len(lora_layers(model))
    qkv = tensors["base_model.model.model.layers.1.attn.Wqkv.lora_A.weight"]  # layer 1: sliding attention
    assert qkv.shape == (4, 32)
    fc1 = tensors["base_model.model.model.layers.0.mlp.fc1.lora_B.weight"]
    assert fc1.shape == (2 * 48, 4)  # [gate | up] fused in the release as in our in_proj


def test_a_subset_of_targets_is_written_by_full_module_name(tmp_path):
    """``out_proj`` would also select attention and GMU layers in PEFT: name the Mamba ones one by one."""
    model = _adapted(["mamba.out_proj", "attention.qkv"])
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert "Wqkv" not in targets and "model.layers.0.attn.out_proj" in targets
    assert len(targets) == len(lora_layers(model))


def test_round_trip_gives_the_same_logits(tmp_path):
    model = _adapted(alpha=6.0)
    tokens = _tokens()
    with torch.no_grad():
        expected = model(tokens)
    save_adapter(model, tmp_path)
    fresh = random_model(small_config())  # the same base weights
    attached = attach_adapter(fresh, read_adapter(tmp_path))
    assert set(attached) == set(lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), expected, rtol=1e-5, atol=1e-5)
        merged = merge_adapter(random_model(small_config()), read_adapter(tmp_path))
        torch.testing.assert_close(merged(tokens), expected, rtol=1e-4, atol=1e-4)


def _skeleton(model: nn.Module) -> nn.Module:
    """A module tree under the checkpoint's names with the base weights: what PEFT wraps in a HF model."""

    class Skeleton(nn.Module):
        def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM looks it up
            return {}

    root = Skeleton()
    for path, layer in linear_layers(model):
        *parents, leaf = hf_module_name(path, model.config).split(".")
        owner = root
        for name in parents:
            if not hasattr(owner, name):
                owner.add_module(name, nn.Module())
            owner = getattr(owner, name)
        linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False)
        linear.weight.data.copy_(layer.weight)
        owner.add_module(leaf, linear)
    return root


def test_peft_loads_our_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = _adapted(["mamba", "attention.qkv", "mlp.in_proj"], alpha=12.0)
    save_adapter(model, tmp_path)
    wrapped = peft.PeftModel.from_pretrained(_skeleton(model), str(tmp_path))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for path, layer in lora_layers(model).items():
        theirs = wrapped.base_model.model.get_submodule(hf_module_name(path, model.config))
        assert hasattr(theirs, "lora_A"), path
        inputs = x[:, : layer.weight.shape[1]]
        update = layer.scaling[0] * inputs @ layer.lora_A[0].T @ layer.lora_B[0].T
        ours = nn.functional.linear(inputs, layer.weight) + update
        torch.testing.assert_close(theirs(inputs), ours, rtol=1e-5, atol=1e-5)


def test_an_adapter_written_by_peft_loads(tmp_path):
    peft = pytest.importorskip("peft")
    model = random_model(small_config())
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["x_proj", "fc2"], use_rslora=True,
                             init_lora_weights=False)  # random B: a non-trivial update
    theirs = peft.get_peft_model(_skeleton(model), config)
    theirs.save_pretrained(str(tmp_path))
    adapter = read_adapter(tmp_path)
    assert len(adapter.layers) == model.config.count(LayerKind.MAMBA) + model.config.n_layers  # x_proj, fc2
    attach_adapter(model, adapter)
    for path, layer in lora_layers(model).items():
        reference = theirs.base_model.model.get_submodule(hf_module_name(path, model.config))
        x = torch.randn(2, layer.weight.shape[1])
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


# bad files ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    save_adapter(_adapted(["mamba.x_proj", "gmu"]), tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_config(directory: Path, **changes) -> None:
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_tensors(directory: Path, edit) -> None:
    file = directory / "adapter_model.safetensors"
    save_file(edit(load_file(file)), file)


def _one_line_error(call, match: str) -> str:
    with pytest.raises(AdapterError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_rank_disagreeing_with_the_config(saved):
    _edit_config(saved, r=8)
    _one_line_error(lambda: read_adapter(saved), r"layers\.0\.attn\.x_proj has rank 4 but adapter_config.json says r=8")


def test_missing_target_module(saved):
    """An adapter for a deeper model: its layer 40 does not exist here."""
    def rename(tensors):
        return {k.replace("model.layers.0.", "model.layers.40."): v for k, v in tensors.items()}

    _edit_tensors(saved, rename)
    adapter = read_adapter(saved)
    model = random_model(small_config())
    _one_line_error(lambda: attach_adapter(model, adapter), r"targets model\.layers\.40\.attn\.x_proj, which this")
    assert not lora_layers(model)  # checked before anything was wrapped


def test_another_models_adapter(saved):
    adapter = read_adapter(saved)
    model = random_model(small_config(d_model=48, n_heads=4, d_ff=64))
    _one_line_error(lambda: merge_adapter(model, adapter), "the adapter is for another model")
    assert not lora_layers(model)


def test_lone_matrix_and_stray_tensor(saved, tmp_path):
    _edit_tensors(saved, lambda t: {k: v for k, v in t.items() if "layers.0.attn.x_proj.lora_B" not in k})
    _one_line_error(lambda: read_adapter(saved), r"x_proj has lora_A but no lora_B")
    _edit_tensors(saved, lambda t: {**t, "base_model.model.model.layers.0.attn.x_proj.lora_magnitude_vector":
                                    torch.ones(4)})
    _one_line_error(lambda: read_adapter(saved), "is not a LoRA matrix of a Linear layer")


@pytest.mark.parametrize(("changes", "match"), [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"r": 0}, "r must be a positive int"),
])
def test_unsupported_options(saved, changes, match):
    _edit_config(saved, **changes)
    _one_line_error(lambda: read_adapter(saved), match)


def test_missing_and_unreadable_files(saved, tmp_path):
    _one_line_error(lambda: read_adapter(tmp_path / "nowhere"), "does not exist")
    _one_line_error(lambda: read_adapter(tmp_path), "not a PEFT adapter directory: no adapter_config.json")
    (saved / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _one_line_error(lambda: read_adapter(saved), "not a readable safetensors file")
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    _one_line_error(lambda: read_adapter(saved), "adapter_model.bin is a pickle")
