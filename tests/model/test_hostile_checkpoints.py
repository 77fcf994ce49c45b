"""Hostile checkpoints (issue 13): one table of malformed model directories, each refused with a one-line
`CheckpointError` that names the file and the field; no file outside the model directory is read, and
absurd sizes fail before anything is allocated.

Every case starts from a copy of the released-format fixture (config.json, index, two shards) and changes
one thing. Header cases rewrite a shard's JSON header and keep its data section, so only the header lies.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

import sambay
from sambay.checkpoint import CheckpointError
from tests.conftest import TINY_FIXTURE

CHECKPOINT = TINY_FIXTURE / "checkpoint"
INDEX = "model.safetensors.index.json"
SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture
def model(tmp_path) -> Path:
    """A fresh copy of the fixture, and beside it ``other/``, a second valid copy a hostile index can point at."""
    shutil.copytree(CHECKPOINT, tmp_path / "other")
    return Path(shutil.copytree(CHECKPOINT, tmp_path / "model"))


# --- mutations: each takes the model directory and edits one file ----------------------------------------


def _edit_json(name: str, edit):
    def mutate(path: Path) -> None:
        data = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(edit(data)))
    return mutate


def _config(**changes):
    return _edit_json("config.json", lambda d: {**d, **changes})


def _replace(name: str, content: bytes):
    return lambda path: (path / name).write_bytes(content)


def _shard_parts(path: Path) -> tuple[dict, bytes]:
    raw = (path / SHARD).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_shard(path: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    (path / SHARD).write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + data)


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _header(edit):
    """Rewrite the shard's header: ``edit(header, names sorted by offset)`` changes it in place."""
    def mutate(path: Path) -> None:
        header, data = _shard_parts(path)
        edit(header, _by_offset(header))
        _write_shard(path, json.dumps(header).encode(), data)
    return mutate


def _raw_header(content: bytes, length: int | None = None):
    """Replace the shard's whole header by ``content`` (and optionally lie about its length)."""
    def mutate(path: Path) -> None:
        _, data = _shard_parts(path)
        _write_shard(path, content, data, length)
    return mutate


def _shift(index: int, by: int):
    """Move one tensor's data_offsets by ``by`` bytes (its size stays right for its shape)."""
    def edit(header, names):
        begin, end = header[names[index]]["data_offsets"]
        header[names[index]]["data_offsets"] = [begin + by, end + by]
    return _header(edit)


def _grow_last(header, names):
    """The last tensor claims 1000 times its bytes, shape and offsets agreeing, past the end of the file."""
    entry = header[names[-1]]
    begin, end = entry["data_offsets"]
    entry["shape"] = [1000 * (end - begin) // 4]
    entry["data_offsets"] = [begin, begin + 1000 * (end - begin)]


def _set(field, value, index=0):
    return _header(lambda header, names: header[names[index]].__setitem__(field, value))


def _index_entry(value, other: str | None = None):
    """Point every tensor of the second shard at ``value`` (a callable gets the model directory)."""
    def mutate(path: Path) -> None:
        index = json.loads((path / INDEX).read_text())
        target = value(path) if callable(value) else value
        index["weight_map"] = {k: (target if v == SHARD else v) for k, v in index["weight_map"].items()}
        (path / INDEX).write_text(json.dumps(index))
    return mutate


def _symlink_out(path: Path) -> None:
    (path / SHARD).unlink()
    os.symlink(path.parent / "other" / SHARD, path / SHARD)


def _drop_from_shard(path: Path) -> None:
    header, data = _shard_parts(path)
    name = _by_offset(header)[-1]
    size = header.pop(name)["data_offsets"]
    _write_shard(path, json.dumps(header).encode(), data[:size[0]])


# (mutation, the file the message names, the field it names, is it a safetensors format violation)
CASES = [
    # paths in the index
    pytest.param(_index_entry(f"../other/{SHARD}"), INDEX, "outside the model directory", False, id="path-traversal"),
    pytest.param(_index_entry(lambda p: str(p.parent / "other" / SHARD)), INDEX, "outside the model directory",
                 False, id="absolute-path"),
    pytest.param(_symlink_out, SHARD, "outside the model directory", False, id="symlink-out"),
    pytest.param(_index_entry(5), INDEX, "weight_map", False, id="int-file-name"),
    pytest.param(_index_entry(""), INDEX, "weight_map", False, id="empty-file-name"),
    pytest.param(_index_entry("a\0b"), INDEX, "weight_map", False, id="nul-in-file-name"),
    pytest.param(_edit_json(INDEX, lambda d: list(d)), INDEX, "JSON object", False, id="index-list"),
    pytest.param(_edit_json(INDEX, lambda d: {**d, "weight_map": list(d["weight_map"])}), INDEX, "weight_map",
                 False, id="weight-map-list"),
    pytest.param(_replace(INDEX, b'{"weight_map": {'), INDEX, "not valid JSON", False, id="index-not-json"),
    # safetensors headers
    pytest.param(_shift(0, -8), SHARD, "data_offsets", True, id="negative-offsets"),
    pytest.param(_shift(1, -4), SHARD, "data_offsets", True, id="overlapping-offsets"),
    pytest.param(_shift(1, 4), SHARD, "data_offsets", True, id="gap-between-tensors"),
    pytest.param(_header(_grow_last), SHARD, "data_offsets", True, id="offsets-past-the-file"),
    pytest.param(_set("shape", [3, 3]), SHARD, "shape", True, id="size-disagrees-with-shape"),
    pytest.param(_set("shape", [-1, 2]), SHARD, "shape", True, id="negative-shape"),
    pytest.param(_set("dtype", "F17"), SHARD, "dtype", True, id="unknown-dtype"),
    pytest.param(_set("dtype", "I32"), SHARD, "dtype", False, id="integer-dtype"),
    pytest.param(_set("data_offsets", "0-16"), SHARD, "data_offsets", True, id="offsets-not-a-list"),
    pytest.param(_header(lambda h, names: h[names[0]].pop("data_offsets")), SHARD, "data_offsets", True,
                 id="missing-data-offsets"),
    pytest.param(_header(lambda h, names: h.__setitem__(names[0], 5)), SHARD, "header entry", True,
                 id="entry-not-an-object"),
    pytest.param(_header(lambda h, names: h.__setitem__("__metadata__", {"format": 1})), SHARD, "__metadata__",
                 True, id="metadata-not-strings"),
    pytest.param(_raw_header(b"[1, 2]"), SHARD, "JSON object", True, id="header-list"),
    pytest.param(_raw_header(b"{not json}"), SHARD, "not valid JSON", True, id="header-not-json"),
    pytest.param(_raw_header(b"{}", length=10**15), SHARD, "header length", True, id="header-length-past-the-file"),
    pytest.param(_replace(SHARD, b"\x01\x00"), SHARD, "header length", True, id="shard-too-short"),
    pytest.param(lambda p: (p / SHARD).write_bytes((p / SHARD).read_bytes() + b"\0" * 8), SHARD, "data_offsets",
                 True, id="bytes-after-the-last-tensor"),
    pytest.param(_drop_from_shard, SHARD, "absent", False, id="indexed-tensor-absent-from-shard"),
    # config.json
    pytest.param(_replace("config.json", b"[1, 2]"), "config.json", "JSON object", False, id="config-list"),
    pytest.param(_replace("config.json", b"\xff\xfe{"), "config.json", "not valid JSON", False, id="config-binary"),
    pytest.param(_config(hidden_size="64"), "config.json", "hidden_size", False, id="config-string-for-int"),
    pytest.param(_config(max_position_embeddings=1e12), "config.json", "max_position_embeddings", False,
                 id="config-float-for-int"),
    pytest.param(_config(layer_norm_eps="tiny"), "config.json", "layer_norm_eps", False, id="config-string-eps"),
    pytest.param(_config(torch_dtype=["float32"]), "config.json", "torch_dtype", False, id="config-list-dtype"),
    pytest.param(_config(sliding_window=[{}]), "config.json", "sliding_window", False, id="config-window-dict"),
    pytest.param(_config(layer_types=7), "config.json", "layer_types", False, id="config-int-layer-types"),
    pytest.param(_config(tie_word_embeddings="yes"), "config.json", "tie_word_embeddings", False,
                 id="config-string-for-bool"),
    pytest.param(_config(num_hidden_layers=10**9), "config.json", "num_hidden_layers", False, id="layers-1e9"),
    pytest.param(_config(vocab_size=2**40), "config.json", "vocab_size", False, id="vocab-2^40"),
    pytest.param(_config(max_position_embeddings=10**12), "config.json", "max_position_embeddings", False,
                 id="positions-1e12"),
    pytest.param(_config(num_hidden_layers=16), "config.json", "num_hidden_layers", False,
                 id="layers-disagree-with-index"),
    pytest.param(_config(hidden_size=128), "-of-00002.safetensors", "shape", False,
                 id="config-shapes-disagree-with-tensors"),
]


@pytest.mark.parametrize(("mutate", "file", "field", "format_violation"), CASES)
def test_hostile_checkpoint_is_one_line_naming_file_and_field(model, mutate, file, field, format_violation):
    mutate(model)
    with pytest.raises(CheckpointError) as error:
        sambay.load_model(model, progress=False)
    message = str(error.value)
    assert file in message and field in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("mutate", "file", "field", "format_violation"),
                         [case for case in CASES if case.values[3]])
def test_the_safetensors_library_refuses_every_header_we_refuse(model, mutate, file, field, format_violation):
    """The format's reference implementation is the oracle: nothing is refused here that it would accept."""
    with safe_open(model / SHARD, framework="pt") as f:  # the untouched shard opens
        assert list(f.keys())
    mutate(model)
    with pytest.raises(SafetensorError):
        safe_open(model / SHARD, framework="pt")


@pytest.mark.parametrize("layers", [10**7, 10**9])
def test_absurd_layer_count_fails_fast_without_allocating(model, layers):
    _config(num_hidden_layers=layers)(model)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match="num_hidden_layers"):
            sambay.load_model(model, progress=False)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 2.0 and peak < 5_000_000, (seconds, peak)  # the plan alone took minutes and GBs


def test_offsets_within_the_directory_and_hf_cache_links_load(tmp_path):
    """What the path rule still accepts: a shard in a subdirectory (``./sub/x``), and the Hugging Face hub
    cache's layout, where ``snapshots/<rev>/<file>`` is a link to ``../../blobs/<hash>``."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted(CHECKPOINT.iterdir())):
        shutil.copy(file, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / file.name)
    reference = sambay.load_model(CHECKPOINT, progress=False)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(sambay.load_model(snapshot, progress=False)(ids), reference(ids))
        plain = Path(shutil.copytree(CHECKPOINT, tmp_path / "plain"))
        (plain / "sub").mkdir()
        (plain / SHARD).rename(plain / "sub" / SHARD)
        _index_entry(f"./sub/{SHARD}")(plain)
        assert torch.equal(sambay.load_model(plain, progress=False)(ids), reference(ids))
