"""Weight-only quantisation of whole models (`sambay.quant`): logits against the float model, the
quantised checkpoint's save → load round trip, and clear errors for bad inputs and damaged files.

Measured bounds (relative L2 error of the logits, ||q - f|| / ||f||, fp32 reference path, 2 × 24 tokens):
    random tiny model (weights ~ N(0, 1/n_in), group 16): int8 0.014, int4 0.23   → asserted < 0.03 / < 0.4
    embedded trained model (default_model, group 64):      int8 0.006, int4 0.058  → asserted < 0.02 / < 0.15
(a bf16 copy of the random model is at 0.011: int8 costs about what bf16 does; int4 round-to-nearest
costs several times more, which the AWQ-style scale search addresses: tests/model/test_quantize_awq.py.)
"""

from __future__ import annotations

import builtins
import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sambay
from sambay.checkpoint import load_model
from sambay.quant import QuantizedLinear, QuantSpec, quantize_model
from sambay.quant.format import save_quantized
from tests.conftest import forward, random_model, small_config
from tests.tolerances import rel_err

DEFAULT_MODEL = Path(sambay.__file__).parent / "default_model"
TOKENS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())


def _quantized(model, bits, group_size=16):
    q = copy.deepcopy(model)
    quantize_model(q, QuantSpec(bits=bits, group_size=group_size))
    return q


@torch.no_grad()
@pytest.mark.parametrize("bits,bound", [(8, 0.03), (4, 0.4)])
def test_logits_close_to_float_model(model, bits, bound):
    q = _quantized(model, bits)
    ref, out = model(TOKENS), q(TOKENS)
    assert rel_err(out, ref) < bound, f"{bits}-bit logits rel err {rel_err(out, ref):.4f}"
    if bits == 8:
        assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@torch.no_grad()
@pytest.mark.parametrize("bits,bound", [(8, 0.02), (4, 0.15)])
def test_embedded_trained_model_logits(bits, bound):
    model = load_model(DEFAULT_MODEL, progress=False)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    q = _quantized(model, bits, group_size=64)
    assert rel_err(q(tokens), model(tokens)) < bound


def test_which_layers_are_quantised(model):
    q = _quantized(model, 4)
    names = {name.rsplit(".", 1)[-1] for name, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert names == {"qkv", "q_proj", "out_proj", "in_proj"}
    kept = {name.rsplit(".", 1)[-1] for name, m in q.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {"x_proj"}  # dt_proj is a DeltaProjection; the embedding is the (tied) head
    assert q.embed.weight.dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_round_trip(model, tmp_path, bits):
    q = _quantized(model, bits)
    save_quantized(q, QuantSpec(bits=bits, group_size=16), tmp_path)
    assert json.loads((tmp_path / "quantization_config.json").read_text()) == {
        "format": "sambay-rtn", "bits": bits, "group_size": 16}
    stored = load_file(tmp_path / "model.safetensors")
    qkv = "model.layers.1.attn.Wqkv"  # layer 1 is sliding attention in the tiny plan
    assert qkv + ".weight" not in stored and stored[qkv + ".scales"].dtype == torch.float32
    assert stored[qkv + ".qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    loaded = load_model(tmp_path, progress=False)
    assert torch.equal(loaded(TOKENS), q(TOKENS))
    for (name, a), (_, b) in zip(q.named_buffers(), loaded.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@torch.no_grad()
def test_cached_decode_matches_full_forward(model):
    q = _quantized(model, 4)
    full = q(TOKENS[:1])
    cache = q.new_cache(batch_size=1, max_length=32)
    steps = [forward(q, TOKENS[:1, :10], cache)[:, -1]]
    steps += [forward(q, TOKENS[:1, i:i + 1], cache)[:, -1] for i in range(10, 24)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 9:], atol=1e-4, rtol=1e-4)


def test_bad_group_size_and_requantising(model):
    with pytest.raises(ValueError, match=r"group size 32 does not divide the 48 inputs of .*mlp\.out_proj"):
        _quantized(model, 8, group_size=32)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match="quantised already"):
        quantize_model(_quantized(model, 8), QuantSpec(bits=4, group_size=16))


@pytest.fixture()
def saved(model, tmp_path) -> Path:
    save_quantized(_quantized(model, 4), QuantSpec(bits=4, group_size=16), tmp_path)
    return tmp_path


def _edit_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.0.attn.in_proj.scales"), "missing tensors: model.layers.0.attn.in_proj.scales"),
    (lambda t: t.update({"model.layers.0.attn.in_proj.scales": torch.zeros(3, 3)}),
     r"in_proj\.scales is F32 \[3, 3\], but the quantization_config.json expects"),
    (lambda t: t.update({"model.layers.0.attn.in_proj.scales": t["model.layers.0.attn.in_proj.scales"].half()}),
     "in_proj.scales is F16"),
    (lambda t: t.update({"model.layers.0.attn.in_proj.qweight": t["model.layers.0.attn.in_proj.qweight"].to(
        torch.int8)}), "in_proj.qweight is I8"),
])
def test_damaged_quantised_checkpoint_is_a_clear_error(saved, edit, message):
    _edit_weights(saved, edit)
    with pytest.raises(ValueError, match=message):
        load_model(saved, progress=False)


def test_bad_quantization_config(saved):
    (saved / "quantization_config.json").write_text(json.dumps({"format": "sambay-rtn", "bits": 3, "group_size": 16}))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        load_model(saved, progress=False)
    (saved / "quantization_config.json").write_text(json.dumps({"format": "gptq", "bits": 4, "group_size": 16}))
    with pytest.raises(ValueError, match="expected"):
        load_model(saved, progress=False)
    (saved / "quantization_config.json").write_text(json.dumps({"format": "sambay-rtn", "bits": 4, "group_size": 32}))
    with pytest.raises(ValueError, match="does not fit the model: group size 32 does not divide"):
        load_model(saved, progress=False)


def test_float_loader_without_quantization_config_names_the_tensors(saved):
    (saved / "quantization_config.json").unlink()
    with pytest.raises(ValueError, match=r"missing tensors.*unexpected tensors: .*qweight"):
        load_model(saved, progress=False)


def test_quantised_checkpoints_are_never_unpickled(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    real_open = builtins.open

    def no_bin(file, *args, **kwargs):
        assert not str(file).endswith((".bin", ".pt", ".pth")), file
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_bin)
    assert any(isinstance(m, QuantizedLinear) for m in load_model(saved, progress=False).modules())
