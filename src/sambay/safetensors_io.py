"""Sharded safetensors checkpoints read defensively: the index, one header validator, and tensor reads.

A model directory holds ``model.safetensors.index.json`` (``{"weight_map": {tensor name: file name}}``) and
the shards it names, or one ``model.safetensors``. `shard_files` refuses any weight file that resolves
outside the directory (`_check_inside`).

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data section, which the tensors' offsets (relative to its start) must tile exactly: from 0, in
order, no gap, no overlap, nothing after, each ``end - begin`` = prod(shape) × the dtype's width.
`read_header` enforces all of it, as the reference (Rust) implementation does when it opens a file, so
that a corrupt or hostile shard is one `CheckpointError` naming the file and the field, never a
traceback, an allocation larger than the file, or header bytes or another tensor's bytes read as
weights (issue 13). Offsets are only ever used after this check.

Reads use plain file I/O (`readinto` a tensor's own buffer) rather than `safetensors.safe_open`: the
library memory-maps the file, whose pages then count in the resident set as a second copy of the
checkpoint (peak 2.16x the checkpoint against 1.04x; docs/benchmarks.md, "Loading the released
checkpoint format"). The library stays the test oracle: it refuses every header refused here
(tests/model/test_hostile_checkpoints.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit (MAX_HEADER_SIZE)

# Every dtype the format defines → its width in bits (F4 and F6 pack several elements per byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# The dtypes `read_tensors` returns as torch tensors (model weights are floating point).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A malformed checkpoint file. The message is one line that names the file and the field at fault."""


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry; offsets are bytes from the start of the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """The validated header of one safetensors file."""

    file: Path
    data_start: int  # 8 + header length: where the data section begins in the file
    tensors: dict[str, TensorEntry]


def parse_json(raw: bytes, where: str):
    """``raw`` parsed as JSON; `CheckpointError` naming ``where`` if it is not (bad syntax, bad UTF-8,
    nesting deep enough to exhaust the recursion limit, or an integer too long to convert)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where} is not valid JSON: {short(str(e), 200)}") from None


def shard_files(root: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} for the model directory ``root`` (sharded with an index, or one file).

    Raises:
        CheckpointError: a malformed index or header, or a weight file outside ``root`` (`_check_inside`).
        FileNotFoundError: no weights, or a shard the index names is absent.
    """
    index = root / INDEX_FILE
    if index.is_file():
        return _indexed_files(root, index)
    single = root / SINGLE_FILE
    if single.is_file():
        _check_inside(root, single, str(single))
        return dict.fromkeys(read_header(single).tensors, single)
    raise FileNotFoundError(
        f"no {INDEX_FILE} or {SINGLE_FILE} in {root} (sambay reads safetensors only, never pickled .bin files)"
    )


def _indexed_files(root: Path, index: Path) -> dict[str, Path]:
    """{tensor name: shard} from the index's weight_map, every value a file name inside ``root``."""
    data = parse_json(index.read_bytes(), str(index))
    if not isinstance(data, dict):
        raise CheckpointError(f"{index} must be a JSON object with a weight_map, got {json_type_name(data)}")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map must be an object of tensor name → file name, "
                              f"got {json_type_name(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{short(repr(name))}] must be a file name, "
                                  f"got {short(repr(shard))}")
    files = {shard: root / shard for shard in set(weight_map.values())}
    for shard, file in files.items():
        _check_inside(root, file, f"{index}: weight_map entry {short(repr(shard))}")
    absent = sorted(shard for shard, file in files.items() if not file.is_file())
    if absent:
        raise FileNotFoundError(f"missing checkpoint shard(s) in {root}: {', '.join(absent)}")
    return {name: files[shard] for name, shard in weight_map.items()}


def _check_inside(root: Path, file: Path, where: str) -> None:
    """Refuse a weight file that resolves outside the model directory, links followed: an index entry such
    as ``../other/x`` or ``/abs/x``, or a shard that is a link out, would read any file, or load another
    model's weights with exit 0 (issue 13).

    One link out is allowed: the Hugging Face hub cache's own layout, where ``snapshots/<rev>/<file>`` links
    to ``../../blobs/<hash>``, so that a downloaded snapshot directory loads as it is.
    """
    base = root.resolve()
    allowed = [base, base.parent.parent / "blobs"] if base.parent.name == "snapshots" else [base]
    try:
        target = file.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a link loop, a NUL in the name
        raise CheckpointError(f"{where}: cannot resolve {file}: {e}") from None
    if not any(target.is_relative_to(directory) for directory in allowed):
        link = f" (a link to {target})" if file.is_symlink() else ""
        raise CheckpointError(f"{where}{link} is outside the model directory {root}")


def read_header(file: Path) -> Header:
    """Read and validate the header of the safetensors file ``file``; no tensor data is read.

    Raises:
        CheckpointError: the header length, the header JSON, an entry's dtype / shape / data_offsets, or
            the layout of the data section breaks the format (the message names the file and the field).
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: not a safetensors file: {size} bytes, too few for the header length")
        n = int.from_bytes(prefix, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{file}: header length {n} does not fit: {size - 8} bytes follow it in the file, "
                                  f"and the format allows at most {MAX_HEADER_BYTES}")
        header = parse_json(f.read(n), f"{file}: the header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the header must be a JSON object of tensor entries, "
                              f"got {json_type_name(header)}")
    _check_metadata(file, header.get("__metadata__", {}))
    data_size = size - 8 - n
    tensors = {name: _entry(file, name, value, data_size) for name, value in header.items() if name != "__metadata__"}
    _check_layout(file, tensors, data_size)
    return Header(file, 8 + n, tensors)


def _check_metadata(file: Path, metadata) -> None:
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: the header's __metadata__ must be an object of strings, "
                              f"got {short(repr(metadata))}")


def _entry(file: Path, name: str, value, data_size: int) -> TensorEntry:
    """One header entry, its types and its size checked (its position is `_check_layout`'s)."""
    where = f"{file}: tensor {short(repr(name))}"
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: the header entry must be an object with dtype, shape and data_offsets, "
                              f"got {json_type_name(value)}")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in value]
    if missing:
        raise CheckpointError(f"{where}: the header entry lacks {', '.join(missing)}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {short(repr(dtype))} (the format's: {', '.join(DTYPE_BITS)})")
    if not _is_sizes(shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {short(repr(shape))}")
    if not (_is_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], non-negative ints with begin <= end, "
                              f"got {short(repr(offsets))}")
    begin, end = offsets
    cap = 8 * data_size + 1  # no dtype is narrower than 4 bits: a tensor this long cannot fit in the file
    numel = _numel(shape, cap)
    if numel * DTYPE_BITS[dtype] != 8 * (end - begin):
        needs = "more bytes than the file holds" if numel >= cap else f"{numel * DTYPE_BITS[dtype] / 8:g} bytes"
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                              f"{short(repr(shape))} of {dtype} needs {needs}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_layout(file: Path, tensors: dict[str, TensorEntry], data_size: int) -> None:
    """Sorted by offset, the tensors must tile the data section: no gap, no overlap, no bytes after (the format
    forbids holes, which would let one file be two things)."""
    position, previous = 0, "the start of the data section"
    for name, e in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            what = f"overlap {previous}" if e.begin < position else f"leave {e.begin - position} bytes after {previous}"
            raise CheckpointError(f"{file}: tensor {short(repr(name))}: data_offsets [{e.begin}, {e.end}] {what}")
        position, previous = e.end, f"tensor {short(repr(name))}"
    if position > data_size:
        raise CheckpointError(f"{file}: truncated: data_offsets of {previous} end at byte {position} of the data "
                              f"section, which holds {data_size}")
    if position < data_size:
        raise CheckpointError(f"{file}: {data_size - position} bytes after the data_offsets of {previous}, "
                              "the last tensor (the format allows no bytes that no tensor owns)")


def check_tensors(files: dict[str, Path], headers: dict[Path, Header], shapes: dict[str, torch.Size]
                   ) -> dict[Path, list[str]]:
    """{file: the tensors to read from it}, once every tensor of ``shapes`` (the model's, built from
    config.json) is in its file with a `TORCH_DTYPES` dtype and that shape.

    A config that disagrees with the checkpoint fails here, before anything is allocated; and since the
    headers are validated, no read then allocates more than its file holds.
    """
    by_file: dict[Path, list[str]] = {}
    for name, shape in shapes.items():
        file = files[name]
        entry = headers[file].tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{file}: tensor {name} is listed in the index but absent from the file")
        if entry.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {entry.dtype}; sambay loads float weights "
                                  f"({', '.join(TORCH_DTYPES)})")
        if entry.shape != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name} has shape {list(entry.shape)} but the model from config.json "
                                  f"has {list(shape)}")
        by_file.setdefault(file, []).append(name)
    return by_file


def read_tensors(header: Header, names: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, CPU tensor) for ``names``, entries of ``header`` whose dtype is in `TORCH_DTYPES`.

    Each tensor is read into its own buffer with ``readinto``, so peak memory is the tensors kept plus one.
    """
    with open(header.file, "rb") as f:
        for name in names:
            entry = header.tensors[name]
            tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
            f.seek(header.data_start + entry.begin)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != entry.end - entry.begin:
                raise CheckpointError(f"{header.file}: truncated while reading tensor {name!r}")
            yield name, tensor


def _is_sizes(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _numel(shape: list[int], cap: int) -> int:
    """prod(shape), or ``cap`` once it is exceeded: a hostile shape of many huge dimensions must not turn
    into a product millions of digits long."""
    if 0 in shape:
        return 0
    n = 1
    for size in shape:
        n *= size
        if n > cap:
            return cap
    return n


def json_type_name(value) -> str:
    """How an error message names the JSON type of ``value`` ("a list", "null", ...)."""
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false",
            type(None): "null", dict: "an object"}.get(type(value), type(value).__name__)


def short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters: a hostile header must not make a megabyte error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
