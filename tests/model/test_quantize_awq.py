"""AWQ-style activation-aware scales (`sambay.quant.awq`) and the ``input_scale`` they add to the quantised
layout (`sambay.quant.format`): the search beats round-to-nearest where input channels have outliers, the
scaled layer is exact up to rounding, the save → load round trip, clear errors for a missing, mis-shaped
or non-positive scale, and the quantised embedded model still answers its arithmetic.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sambay.checkpoint import load_model
from sambay.default_model import default_model_dir
from sambay.ops.quantized_matmul import dequantize_ref, quantize_rtn
from sambay.quant import QuantizedLinear, QuantSpec, quantize_model
from sambay.quant.awq import (
    Activations,
    calibration_sequences,
    collect_activations,
    quantize_model_awq,
    search_scale,
)
from sambay.quant.format import save_quantized
from sambay.quant.layer import projections
from sambay.tokenizer import load_tokenizer
from sambay.train.arithmetic import make_split, render
from sambay.train.evaluate import exact_match
from tests.conftest import random_model, small_config
from tests.train.test_default_model import MAX_REPLY_TOKENS, held_out_problems

SPEC = QuantSpec(bits=4, group_size=16, input_scale=True)
TOKENS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
SCALE = "model.layers.0.attn.in_proj.input_scale"  # layer 0 is a Mamba in the tiny plan


def _outlier_activations(rows: int, n_in: int, seed: int) -> torch.Tensor:
    """Activations whose channels 3, 17 and 40 are 30x larger than the rest (as LLM activations have)."""
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(seed))  # (rows, n_in)
    x[:, [3, 17, 40]] *= 30.0
    return x


def _output_error(x, weight, qweight, scales, input_scale=None):
    w = dequantize_ref(qweight, scales, 4, 32)
    xs = x if input_scale is None else x * input_scale
    return ((xs @ w.t() - x @ weight.t()).norm() / (x @ weight.t()).norm()).item()


def test_scale_search_beats_round_to_nearest_on_outlier_channels():
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) / 8  # (n_out, n_in)
    calib = _outlier_activations(256, 64, seed=1)
    result = search_scale(weight, Activations(calib.abs().mean(0), calib), bits=4, group_size=32)
    assert result.alpha > 0 and result.error < 0.7 * result.rtn_error, result
    # on activations the search never saw, the stored layout (W diag(s) quantised, x / s) still wins
    held_out = _outlier_activations(256, 64, seed=2)
    rtn = _output_error(held_out, weight, *quantize_rtn(weight, 4, 32))
    awq = _output_error(held_out, weight, *quantize_rtn(weight * result.scale, 4, 32), 1 / result.scale)
    assert awq < 0.7 * rtn, (awq, rtn)


def test_scale_search_without_outliers_keeps_alpha_zero_or_improves():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    result = search_scale(weight, Activations(x.abs().mean(0), x), bits=8, group_size=16)
    assert result.error <= result.rtn_error
    assert search_scale(weight, Activations(torch.zeros(32), x), 8, 16).scale.isfinite().all()  # a dead input


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())


def test_collect_activations_leaves_no_hooks(model):
    sequences = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(5))
    found = collect_activations(model, sequences, batch_size=2, max_rows=50)
    assert set(found) == {path for path, _ in projections(model)}
    for path, linear in projections(model):
        assert found[path].mean_abs.shape == (linear.in_features,) and found[path].sample.shape[0] <= 50
        assert not linear._forward_pre_hooks
    assert torch.equal(calibration_sequences(list(range(10)), 8, 3), torch.arange(6).view(2, 3))
    assert calibration_sequences([1, 2], 8, 3).tolist() == [[1, 2]]


@pytest.fixture(scope="module")
def awq_model(model):
    q = copy.deepcopy(model)
    calibration = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(4))
    found = quantize_model_awq(q, SPEC, calibration, max_rows=64)
    assert any(r.alpha > 0 for r in found.values())
    return q, found


@torch.no_grad()
def test_input_scale_is_applied_to_the_activations(model, awq_model):
    q, found = awq_model
    path = "self_decoder.layers.0.mixer.in_proj"
    layer, linear = q.get_submodule(path), model.get_submodule(path)
    assert isinstance(layer, QuantizedLinear) and torch.equal(layer.input_scale, 1 / found[path].scale)
    x = torch.randn(5, linear.in_features)
    expected = (x / found[path].scale) @ dequantize_ref(layer.qweight, layer.scales, 4, 16).t()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert "input_scale" in repr(layer)


@torch.no_grad()
def test_awq_save_load_round_trip(awq_model, tmp_path):
    q, _ = awq_model
    save_quantized(q, SPEC, tmp_path)
    assert json.loads((tmp_path / "quantization_config.json").read_text()) == {
        "format": "sambay-awq", "bits": 4, "group_size": 16}
    stored = load_file(tmp_path / "model.safetensors")
    assert stored[SCALE].dtype == torch.float32 and stored[SCALE].shape == (32,)
    loaded = load_model(tmp_path, progress=False)
    assert torch.equal(loaded(TOKENS), q(TOKENS))
    for (name, a), (_, b) in zip(q.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@pytest.fixture()
def saved_awq(awq_model, tmp_path):
    save_quantized(awq_model[0], SPEC, tmp_path)
    return tmp_path


def _edit_weights(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(SCALE), f"missing tensors: {SCALE}"),
    (lambda t: t.update({SCALE: torch.ones(3)}), r"in_proj\.input_scale is F32 \[3\], but the quantization_config"),
    (lambda t: t.update({SCALE: t[SCALE].half()}), r"in_proj\.input_scale is F16"),
    (lambda t: t[SCALE].__setitem__(0, 0.0), r"in_proj\.input_scale must be finite and positive"),
    (lambda t: t[SCALE].__setitem__(1, float("nan")), r"in_proj\.input_scale must be finite and positive"),
])
def test_bad_input_scale_is_a_clear_error(saved_awq, edit, message):
    _edit_weights(saved_awq, edit)
    with pytest.raises(ValueError, match=message):
        load_model(saved_awq, progress=False)


def test_input_scale_in_a_round_to_nearest_checkpoint_is_unexpected(saved_awq):
    (saved_awq / "quantization_config.json").write_text(json.dumps({"format": "sambay-rtn", "bits": 4,
                                                                    "group_size": 16}))
    with pytest.raises(ValueError, match=r"unexpected tensors: .*input_scale"):
        load_model(saved_awq, progress=False)


def test_input_scales_must_match_the_spec(model):
    with pytest.raises(ValueError, match=r"exactly when spec\.input_scale"):
        quantize_model(copy.deepcopy(model), QuantSpec(bits=4, group_size=16), {})
    with pytest.raises(ValueError, match=r"no input scale for self_decoder\.layers\.0\.mixer\.in_proj"):
        quantize_model(copy.deepcopy(model), SPEC, {})
    scales = {path: torch.ones(linear.in_features) for path, linear in projections(model)}
    scales["self_decoder.layers.0.mixer.in_proj"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"input scale of self_decoder.layers.0.mixer.in_proj must be 32 finite"):
        quantize_model(copy.deepcopy(model), SPEC, scales)
    with pytest.raises(ValueError, match="input_scale=True"):
        quantize_model_awq(copy.deepcopy(model), QuantSpec(bits=4, group_size=16), TOKENS)


@pytest.mark.parametrize("bits,awq", [(8, False), (4, True)])
def test_quantised_embedded_model_answers_held_out_problems(bits, awq):
    directory = default_model_dir()
    model, tokenizer = load_model(directory, dtype=torch.float32, progress=False), load_tokenizer(directory)
    if awq:  # calibrated on training-split problems, scored on held-out ones
        heldout = {e["messages"][0]["content"].replace(" ", "") for e in make_split(500, seed=1)}
        text = "".join(render(e["messages"]) for e in make_split(20, seed=2, exclude=heldout))
        sequences = calibration_sequences(tokenizer.encode(text), 1024, 256)
        quantize_model_awq(model, QuantSpec(bits=bits, group_size=64, input_scale=True), sequences, max_rows=256)
    else:
        quantize_model(model, QuantSpec(bits=bits, group_size=64))
    examples = held_out_problems(tokenizer, {"+": 4, "-": 3, "*": 3})
    result = exact_match(model, tokenizer, examples, max_new_tokens=MAX_REPLY_TOKENS + 8)
    assert result["accuracy"] >= 0.9, result
