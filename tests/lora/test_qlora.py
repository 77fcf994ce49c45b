"""QLoRA (`sambay.lora` over `sambay.quant`): LoRA adapters on a frozen int8 / int4 base.

Zero-B adapters leave the quantised model's logits as they were; training moves A and B only and leaves the
int weights and scales bitwise unchanged; the base is recomputed in backward instead of its dequantised
weight being kept; the adapter saved from the quantised model carries the float checkpoint's module names
and applies to the float model; a quantised base cannot be merged into or fully fine-tuned; adapters served
side by side (the gathered matmul) and ``--lora`` (`apply_adapter`) work on the quantised model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sambay.checkpoint import save_model
from sambay.generate import Engine, SamplingParams
from sambay.lora import (
    AdapterError,
    LoRALinear,
    QLoRALinear,
    apply_adapter,
    apply_lora,
    attach_adapter,
    attach_adapters,
    bind_adapter_index,
    lora_layers,
    merge_adapter,
    merge_lora,
    read_adapter,
    save_adapter,
)
from sambay.quant import QuantizedLinear, QuantSpec, quantize_model
from sambay.quant.format import save_quantized
from sambay.train.config import TrainConfig
from sambay.train.setup import Runtime, build_model
from tests.conftest import random_model, small_config
from tests.tolerances import FP32_MODEL, assert_close, rel_err

GROUP = 16  # divides every projection's inputs in small_config


def _tokens(b: int = 2, t: int = 13, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def _quantized(bits: int, seed: int = 0) -> nn.Module:
    model = random_model(small_config(), seed=seed)
    with torch.no_grad():
        quantize_model(model, QuantSpec(bits=bits, group_size=GROUP))
    return model


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{path without LoRA's ``.base``: tensor} of every quantised layer's int weights and scales, cloned."""
    return {name.replace(".base.", "."): t.detach().clone() for name, t in model.named_buffers()
            if name.endswith(("qweight", "scales", "input_scale"))}


def _randomize_b(model: nn.Module, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0.0, std, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_b_equals_the_quantized_base(bits):
    model = _quantized(bits)
    tokens = _tokens()
    base = model(tokens)
    n_quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    layers = apply_lora(model, rank=4, alpha=8)
    qlora = [layer for layer in layers.values() if isinstance(layer, QLoRALinear)]
    assert len(qlora) == n_quantized > 0  # every quantised projection is a target
    assert all(isinstance(layer.base, QuantizedLinear) for layer in qlora)
    assert all(layer.lora_A.shape[2] == layer.base.in_features and layer.lora_B.shape[1] == layer.base.out_features
               for layer in qlora)
    assert torch.equal(model(tokens), base)


def test_training_moves_only_the_adapters_and_keeps_the_quantized_buffers():
    model = _quantized(4)
    before = _buffers(model)
    float_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8, generator=torch.Generator().manual_seed(2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert not any(b.requires_grad for b in model.buffers())
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    tokens = _tokens(4, 16)
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    after = _buffers(model)
    assert before.keys() == after.keys() and len(before) > 0
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, float_params[name.replace(".base.", ".")]), name
    assert all(torch.count_nonzero(layer.lora_B) for layer in lora_layers(model).values())


def test_backward_recomputes_the_base_instead_of_keeping_its_weight():
    base = QuantizedLinear(32, 48, QuantSpec(bits=4, group_size=GROUP), random_model(small_config()).ops)
    with torch.no_grad():
        from sambay.ops.quantized_matmul import quantize_rtn

        base.qweight, base.scales = quantize_rtn(torch.randn(48, 32), 4, GROUP)
    layer = QLoRALinear(base, 4, 8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 32, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    assert saved and torch.Size([48, 32]) not in saved and torch.Size([32, 48]) not in saved, saved
    # the gradients are those of the plain computation, base(x) + s · B (A x)
    x2 = x.detach().clone().requires_grad_(True)
    A, B = layer.lora_A.detach().clone().requires_grad_(True), layer.lora_B.detach().clone().requires_grad_(True)
    expected = base(x2) + 2.0 * F.linear(F.linear(x2, A[0]), B[0])
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.lora_A.grad, A.grad)
    torch.testing.assert_close(layer.lora_B.grad, B.grad)


def test_adapter_from_the_quantized_base_applies_to_the_float_base(tmp_path):
    float_model = random_model(small_config())
    quantized = copy.deepcopy(float_model)
    with torch.no_grad():
        quantize_model(quantized, QuantSpec(bits=8, group_size=GROUP))
    apply_lora(quantized, rank=4, alpha=8, generator=torch.Generator().manual_seed(2))
    _randomize_b(quantized)
    directory = save_adapter(quantized, tmp_path / "adapter")
    tensors = load_file(directory / "adapter_model.safetensors")
    assert tensors and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)  # no int weights
    assert not any("qweight" in k or "scales" in k or "base" in k.removeprefix("base_model.model.") for k in tensors)
    assert "base_model.model.model.layers.0.attn.in_proj.lora_A.weight" in tensors  # the checkpoint's names
    assert json.loads((directory / "adapter_config.json").read_text())["r"] == 4
    adapter = read_adapter(directory)
    tokens = _tokens()
    with torch.no_grad():
        trained = quantized(tokens)
        # on a fresh copy of the quantised base: the trained model, exactly
        again = copy.deepcopy(float_model)
        quantize_model(again, QuantSpec(bits=8, group_size=GROUP))
        attach_adapter(again, adapter)
        assert torch.equal(again(tokens), trained)
        # on the float base (the one merge and --lora use): the same layers, and int8's error only
        on_float = copy.deepcopy(float_model)
        attached = attach_adapter(on_float, adapter)
        assert set(attached) == set(lora_layers(quantized)) and not any(
            isinstance(layer, QLoRALinear) for layer in attached.values())
        for path, layer in attached.items():
            assert torch.equal(layer.lora_A, lora_layers(quantized)[path].lora_A.detach())
            assert torch.equal(layer.lora_B, lora_layers(quantized)[path].lora_B.detach())
        unmerged = on_float(tokens)
        plain = float_model(tokens)
        assert rel_err(unmerged, trained) < 0.03 < rel_err(plain, trained)
        merged = merge_adapter(copy.deepcopy(float_model), adapter)(tokens)
        assert rel_err(merged, unmerged) < 1e-5


def test_merging_into_a_quantized_base_is_a_clear_error(tmp_path):
    donor = random_model(small_config())
    apply_lora(donor, ["mlp"], rank=2)
    _randomize_b(donor)
    adapter = read_adapter(save_adapter(donor, tmp_path / "adapter"))
    model = _quantized(4)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=r"quantised.*merge it into the float checkpoint"):
        merge_adapter(model, adapter)
    assert not lora_layers(model) and model.state_dict().keys() == state.keys()  # left as it was
    apply_lora(model, ["mlp"], rank=2)
    with pytest.raises(ValueError, match="its base is quantised"):
        merge_lora(model)
    assert all(isinstance(layer, LoRALinear) for layer in lora_layers(model).values())


@torch.no_grad()
def test_apply_adapter_keeps_it_unmerged_on_a_quantized_model(tmp_path):
    float_model = random_model(small_config())
    donor = copy.deepcopy(float_model)
    apply_lora(donor, rank=4, alpha=8)
    _randomize_b(donor)
    adapter = read_adapter(save_adapter(donor, tmp_path / "adapter"))
    quantized = copy.deepcopy(float_model)
    quantize_model(quantized, QuantSpec(bits=8, group_size=GROUP))
    expected = copy.deepcopy(quantized)
    attach_adapter(expected, adapter)
    apply_adapter(quantized, adapter)
    tokens = _tokens()
    assert lora_layers(quantized) and torch.equal(quantized(tokens), expected(tokens))
    assert all(layer.lora_A.dtype == quantized.dtype for layer in lora_layers(quantized).values())
    assert not lora_layers(apply_adapter(float_model, adapter))  # a float model: folded in
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    prompt = _tokens(1, 7)[0].tolist()
    tokens_engine = Engine(quantized).generate([prompt], greedy)[0][0].token_ids
    tokens_direct = Engine(expected).generate([prompt], greedy)[0][0].token_ids
    assert tokens_engine == tokens_direct and len(tokens_engine) == 6


@torch.no_grad()
def test_served_adapters_on_a_quantized_base_use_the_gathered_matmul(tmp_path):
    float_model = random_model(small_config())
    adapters = []
    for seed, (targets, rank) in enumerate(((["all"], 4), (["attention", "mlp"], 2)), start=1):
        donor = copy.deepcopy(float_model)
        apply_lora(donor, targets, rank=rank, alpha=2.0 * rank, generator=torch.Generator().manual_seed(seed))
        _randomize_b(donor, seed)
        adapters.append(read_adapter(save_adapter(donor, tmp_path / f"a{seed}")))
    quantized = copy.deepcopy(float_model)
    quantize_model(quantized, QuantSpec(bits=4, group_size=GROUP))
    served = copy.deepcopy(quantized)
    layers = attach_adapters(served, adapters)
    assert any(isinstance(layer, QLoRALinear) for layer in layers.values())
    index = torch.tensor([2, 0, 1])  # row 0: adapter 2, row 1: the base model, row 2: adapter 1
    bind_adapter_index(served, index)
    tokens = _tokens(3, 9)
    mixed = served(tokens)
    for row, slot in enumerate(index.tolist()):
        model = copy.deepcopy(quantized)
        if slot:
            attach_adapter(model, adapters[slot - 1], dtype=model.dtype)
        alone = model(tokens[row : row + 1])
        assert_close(mixed[row : row + 1], alone, **FP32_MODEL, what=f"row {row} (slot {slot})")
    assert rel_err(mixed[0], mixed[2]) > 0.01  # the rows' adapters differ


def _quantized_dir(tmp_path, bits: int = 4):
    model = random_model(small_config())
    with torch.no_grad():
        quantize_model(model, QuantSpec(bits=bits, group_size=GROUP))
    directory = tmp_path / f"int{bits}"
    save_quantized(model, QuantSpec(bits=bits, group_size=GROUP), directory)
    return directory


def test_full_fine_tuning_of_a_quantized_model_is_a_clear_error(tmp_path):
    directory = _quantized_dir(tmp_path)
    with pytest.raises(ValueError, match=r"is quantised .* train LoRA adapters on it \(--lora-rank R, QLoRA\)"):
        TrainConfig(init_from=str(directory))
    with pytest.raises(ValueError, match=r"quantize_base .*set lora_rank too"):
        TrainConfig(quantize_base=4)
    with pytest.raises(ValueError, match="quantised already"):
        TrainConfig(init_from=str(directory), lora_rank=4, quantize_base=8)
    with pytest.raises(ValueError, match="quantize_base must be 0, 4 or 8"):
        TrainConfig(quantize_base=3, lora_rank=4)
    with pytest.raises(ValueError, match="group size"):
        TrainConfig(quantize_base=4, quantize_group_size=3, lora_rank=4)


def test_build_model_gives_qlora_layers_on_a_quantized_base(tmp_path):
    directory = _quantized_dir(tmp_path, bits=8)
    runtime = Runtime(rank=0, world=1, device=torch.device("cpu"))
    model = build_model(TrainConfig(init_from=str(directory), lora_rank=4, dtype="float32"), runtime)
    qlora = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert qlora and all(m.base.bits == 8 for m in qlora)
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    # --quantize-base: a float base quantised on load, as `sambay quantize` would
    float_dir = tmp_path / "float"
    save_model(random_model(small_config()), float_dir)
    config = TrainConfig(init_from=str(float_dir), lora_rank=2, lora_targets=["mlp"], quantize_base=4,
                         quantize_group_size=GROUP, dtype="float32")
    model = build_model(config, runtime)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.bits == 4 and m.group_size == GROUP for m in quantized)
    assert {type(m) for m in lora_layers(model).values()} == {QLoRALinear}
