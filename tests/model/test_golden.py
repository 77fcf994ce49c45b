"""Golden parity against the reference implementation's logits on the tiny checkpoint fixtures."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sambay
from tests.conftest import TINY_FIXTURE, forward
from tests.tolerances import GOLDEN_FP32_REL_TO_MAX, LOW_PRECISION_FACTOR, max_err, rel_err

FIXTURES = {"fp32-weights": TINY_FIXTURE, "released-dtypes": TINY_FIXTURE / "released-dtypes"}


def _cases(root):
    expected = load_file(root / "expected.safetensors")
    names = sorted({k.split(".")[0] for k in expected})
    return [(name, {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(name + ".")}) for name in names]


def _decode(model, ids, prompt_len):
    """Prefill the prompt into a cache, then feed the rest one token at a time; logits after each token."""
    cache = model.new_cache(batch_size=ids.shape[0], max_length=ids.shape[1])
    forward(model, ids[:, :prompt_len], cache)
    return torch.cat([forward(model, ids[:, t : t + 1], cache) for t in range(prompt_len, ids.shape[1])], dim=1)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_fp32_full_forward_and_decode_match_reference(fixture):
    root = FIXTURES[fixture]
    model = sambay.load_model(root / "checkpoint", dtype=torch.float32, progress=False)
    with torch.no_grad():
        for name, case in _cases(root):
            ids, p = case["input_ids"], int(case["prompt_len"])
            ref = case["logits_fp32"]
            bound = GOLDEN_FP32_REL_TO_MAX * ref.abs().max().item()
            assert max_err(model(ids), ref) <= bound, f"{name}: full forward"
            dec_ref = case["decode_logits_fp32"]
            assert max_err(_decode(model, ids, p), dec_ref) <= bound, f"{name}: cached decode"


@pytest.mark.parametrize("fixture", FIXTURES)
def test_bf16_error_within_twice_the_reference_bf16_error(fixture):
    root = FIXTURES[fixture]
    model = sambay.load_model(root / "checkpoint", dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        for name, case in _cases(root):
            ids, p = case["input_ids"], int(case["prompt_len"])
            own = rel_err(case["logits_bf16ref"], case["logits_fp32"])
            assert rel_err(model(ids), case["logits_fp32"]) <= LOW_PRECISION_FACTOR * own, name
            own_dec = rel_err(case["decode_logits_bf16ref"], case["decode_logits_fp32"])
            dec = _decode(model, ids, p)
            assert rel_err(dec, case["decode_logits_fp32"]) <= LOW_PRECISION_FACTOR * own_dec, name


def test_hidden_states_of_every_layer_match_reference():
    """Localises a regression: the input of each layer equals the reference's, layer by layer."""
    model = sambay.load_model(TINY_FIXTURE / "checkpoint", dtype=torch.float32, progress=False)
    name, case = _cases(TINY_FIXTURE)[0]
    ids, hidden = case["input_ids"], case["hidden_states_fp32"]  # (L + 1, b, t, d)
    captured = []
    blocks = [*model.self_decoder.layers, *model.cross_decoder.layers]
    hooks = [b.register_forward_pre_hook(lambda m, args: captured.append(args[0].clone())) for b in blocks]
    norm = model.norm  # the final LayerNorm, applied to the last block's output
    hooks.append(blocks[-1].register_forward_hook(lambda m, args, out: captured.append(
        torch.nn.functional.layer_norm(out[0], (out[0].shape[-1],), norm.weight, norm.bias, norm.eps))))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert len(captured) == hidden.shape[0]
    for layer, (ours, ref) in enumerate(zip(captured, hidden, strict=True)):
        scale = ref.abs().max().item()
        assert max_err(ours, ref) <= 1e-4 * max(scale, 1.0), f"{name}: input of layer {layer} differs"


def test_released_dtypes_keep_A_log_and_lambda_fp32():
    model = sambay.load_model(TINY_FIXTURE / "released-dtypes" / "checkpoint", progress=False)
    assert model.dtype == torch.bfloat16  # the checkpoint's torch_dtype
    fp32 = model.fp32_parameters()
    assert len(fp32) == 3 + 4 * 4  # 3 Mamba A_log, 4 attention layers x 4 λ vectors
    assert all(p.dtype == torch.float32 for p in fp32)
