"""Checkpoint I/O in the released format: round trips, name mapping, and errors that name the problem."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import sambay
from sambay.checkpoint import from_hf_state_dict, to_hf_state_dict
from tests.conftest import TINY_FIXTURE, random_model, small_config

CHECKPOINT = TINY_FIXTURE / "checkpoint"
RELEASED_DTYPES = TINY_FIXTURE / "released-dtypes" / "checkpoint"


def _copy(tmp_path, src=CHECKPOINT):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("src", [CHECKPOINT, RELEASED_DTYPES])
def test_load_save_load_is_the_identity(tmp_path, src):
    model = sambay.load_model(src, progress=False)
    sambay.save_model(model, tmp_path / "saved", max_shard_bytes=400_000)  # forces several shards
    saved, original = _tensors(tmp_path / "saved"), _tensors(src)
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    again = sambay.load_model(tmp_path / "saved", progress=False)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["torch_dtype"] == (
        json.loads((src / "config.json").read_text())["torch_dtype"])


def test_single_file_checkpoint_loads(tmp_path):
    dst = tmp_path / "single"
    dst.mkdir()
    shutil.copy(CHECKPOINT / "config.json", dst)
    save_file(_tensors(CHECKPOINT), dst / "model.safetensors")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(sambay.load_model(dst, progress=False)(ids),
                           sambay.load_model(CHECKPOINT, progress=False)(ids))


def test_hf_named_state_dict_round_trip_is_identity_on_random_weights():
    model = random_model(small_config(), seed=3)
    state = {k: v.clone() for k, v in to_hf_state_dict(model).items()}
    other = random_model(small_config(), seed=4)
    from_hf_state_dict(other, state)
    assert all(torch.equal(state[k], v) for k, v in to_hf_state_dict(other).items())


def test_load_goes_to_requested_dtype_and_device():
    model = sambay.load_model(RELEASED_DTYPES, dtype=torch.float32, device="cpu", progress=False)
    assert model.dtype == torch.float32 and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())


def _rewrite_shard(path, edit):
    shard = path / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)


def test_missing_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = next(k for k, v in index["weight_map"].items() if v.endswith("00002.safetensors"))
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(f"1 missing tensors: {name}")):
        sambay.load_model(path, progress=False)


def test_unexpected_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.99.attn.bogus"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape("unexpected tensors: model.layers.99.attn.bogus")):
        sambay.load_model(path, progress=False)


def test_misshaped_tensor_is_named(tmp_path):
    path = _copy(tmp_path)
    name = next(iter(load_file(path / "model-00002-of-00002.safetensors")))
    _rewrite_shard(path, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=f"tensor {name} has shape \\[3, 3\\]"):
        sambay.load_model(path, progress=False)


def test_missing_shard_is_named(tmp_path):
    path = _copy(tmp_path)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("model-00002-of-00002.safetensors")):
        sambay.load_model(path, progress=False)


def test_unsupported_model_type(tmp_path):
    path = _copy(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        sambay.load_model(path, progress=False)


def test_pickles_are_never_loaded(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(CHECKPOINT / "config.json", path)
    torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never pickled"):
        sambay.load_model(path, progress=False)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        sambay.load_model(tmp_path / "nowhere", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sambay.load_model(tmp_path / "bad", progress=False)


def _add_lm_head(path, head):
    _rewrite_shard(path, lambda t: t.__setitem__("lm_head.weight", head))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_tied_lm_head_equal_to_the_embedding_is_accepted_silently(tmp_path, caplog):
    path = _copy(tmp_path)
    _add_lm_head(path, _tensors(CHECKPOINT)["model.embed_tokens.weight"])
    with caplog.at_level("WARNING", logger="sambay.checkpoint"):
        sambay.load_model(path, progress=False)
    assert not caplog.records


def test_tied_lm_head_that_differs_from_the_embedding_warns(tmp_path, caplog):
    path = _copy(tmp_path)
    _add_lm_head(path, torch.zeros(256, 64))
    with caplog.at_level("WARNING", logger="sambay.checkpoint"):
        model = sambay.load_model(path, progress=False)
    [record] = caplog.records
    assert "lm_head.weight differs from the embedding" in record.message
    assert '"tie_word_embeddings": false' in record.message
    reference = sambay.load_model(CHECKPOINT, progress=False)  # the stored head is ignored, as before
    assert torch.equal(model.embed.weight, reference.embed.weight)


def test_tied_lm_head_in_a_state_dict_warns_when_it_differs(caplog):
    model = random_model(small_config(), seed=3)
    state = {k: v.clone() for k, v in to_hf_state_dict(model).items()}
    with caplog.at_level("WARNING", logger="sambay.checkpoint"):
        from_hf_state_dict(model, {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
        assert not caplog.records
        from_hf_state_dict(model, {**state, "lm_head.weight": torch.zeros_like(state["model.embed_tokens.weight"])})
    assert "tie_word_embeddings" in caplog.text


@pytest.mark.parametrize("key,value", [("torch_dtype", "int8"), ("torch_dtype", "float8_e4m3fn"),
                                       ("dtype", "int4")])
def test_unsupported_torch_dtype_is_refused(tmp_path, key, value):
    path = _copy(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=f"{key}='{value}' is not supported; supported: bfloat16, float16, float32"):
        sambay.load_model(path, progress=False)


def test_a_file_in_the_model_directory_stands_for_the_directory(tmp_path):
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        expected = sambay.load_model(CHECKPOINT, progress=False)(ids)
        for name in ("config.json", "model-00001-of-00002.safetensors"):
            assert torch.equal(sambay.load_model(CHECKPOINT / name, progress=False)(ids), expected)
    (tmp_path / "notes.txt").write_text("")  # a file whose directory is no model directory
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"expected a model directory, got a file: {tmp_path / 'notes.txt'}; use its directory")):
        sambay.load_model(tmp_path / "notes.txt", progress=False)


def test_truncated_shard_is_an_error(tmp_path):
    path = _copy(tmp_path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        sambay.load_model(path, progress=False)
