"""LoRA applied from outside the model (`sambay.lora`): zero-B identity, every target reached, merge == unmerged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sambay.checkpoint import to_hf_state_dict
from sambay.config import LayerKind
from sambay.lora import GROUPS, TARGETS, LoRALinear, apply_lora, lora_layers, merge_lora, resolve_targets
from tests.conftest import forward, random_model, small_config


def _randomize_b(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, std, generator=g)


def _tokens(b: int = 2, t: int = 11) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(5))


def test_zero_b_equals_the_base_model():
    model = random_model(small_config())
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        adapters = apply_lora(model, rank=4, alpha=8)
        adapted = model(tokens)
    assert adapters and all(torch.count_nonzero(a.lora_A) > 0 for a in adapters.values())  # A is not zero
    assert torch.equal(adapted, base)


def test_base_is_frozen_and_only_a_b_train():
    model = random_model(small_config())
    apply_lora(model, ["mamba", "mlp.out_proj"], rank=2)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    model(_tokens()).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    assert all(model.get_parameter(name).grad is not None for name in trainable)


def test_groups_wrap_the_layers_of_their_kind():
    config = small_config()
    n = {kind: config.count(kind) for kind in LayerKind}
    n_attention = n[LayerKind.SLIDING_ATTENTION] + n[LayerKind.FULL_ATTENTION] + n[LayerKind.CROSS_ATTENTION]
    expected = {"attention": 2 * n_attention, "mamba": 4 * n[LayerKind.MAMBA], "gmu": 2 * n[LayerKind.GMU],
                "mlp": 2 * config.n_layers}
    for group, count in expected.items():
        model = random_model(config)
        assert len(apply_lora(model, [group], rank=2)) == count, group
    model = random_model(config)
    assert len(apply_lora(model, rank=2)) == sum(expected.values())


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_target_changes_the_logits(target):
    """Each projection's adapter is on the forward path (Mamba's dt_proj included, which the scan adds a bias to)."""
    model = random_model(small_config())
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
        apply_lora(model, [target], rank=2)
        _randomize_b(model)
        assert (model(tokens) - base).abs().max() > 1e-3


def test_merged_equals_unmerged_and_restores_plain_linears():
    model = random_model(small_config())
    names = [name for name, _ in model.named_parameters()]
    tokens = _tokens()
    apply_lora(model, rank=4, alpha=8)
    _randomize_b(model)
    with torch.no_grad():
        unmerged = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert not lora_layers(model) and [name for name, _ in model.named_parameters()] == names
    assert len(to_hf_state_dict(model)) == len(names)  # checkpoint names again: save_model writes it


def test_cached_decode_with_adapters_equals_full_forward():
    """The engine's path (prefill, then one-token steps through the cache) sees the unmerged adapters too."""
    model = random_model(small_config())
    apply_lora(model, rank=4)
    _randomize_b(model)
    tokens = _tokens(b=2, t=9)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_length=16)
        steps = [forward(model, tokens[:, :4], cache, last_only=False)]
        steps += [forward(model, tokens[:, i : i + 1], cache, last_only=False) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_bf16_base_with_fp32_adapters_under_autocast():
    """The LoRA training setup on a GPU: a frozen bf16 base, fp32 adapters, bf16 autocast."""
    model = random_model(small_config()).to_dtype(torch.bfloat16)
    apply_lora(model, rank=2)
    assert all(layer.lora_A.dtype == torch.float32 for layer in lora_layers(model).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(_tokens())
    logits.float().mean().backward()
    assert all(layer.lora_A.grad is not None for layer in lora_layers(model).values())


def test_targets_are_checked():
    assert resolve_targets(["mamba.x_proj", "gmu"]) == ("mamba.x_proj", "gmu.in_proj", "gmu.out_proj")
    assert resolve_targets(["all"]) == GROUPS["all"] == tuple(TARGETS)
    with pytest.raises(ValueError, match=r"unknown LoRA target 'mamba\.conv'"):
        resolve_targets(["mamba.conv"])
    with pytest.raises(ValueError, match="no LoRA targets"):
        resolve_targets([])
    model = random_model(small_config())
    apply_lora(model, ["mlp"], rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, ["mlp.in_proj"], rank=2)
    assert isinstance(model.self_decoder.layers[0].mlp.in_proj, LoRALinear)
