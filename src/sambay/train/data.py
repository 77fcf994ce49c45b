"""Training data: documents tokenized once into memory-mapped token shards, then read as packed windows.

`prepare_data` turns text (.txt: one document per file; .jsonl: ``{"text": ...}`` per line) or chat
JSONL (``{"messages": [...]}`` per line, see `sambay.train.chat`) into shards::

    data_dir/meta.json                         dtype, vocab, shard sizes, a fingerprint of the inputs
    data_dir/token_bytes.npy                   UTF-8 bytes per token id (for bits per byte)
    data_dir/{train,eval}/shard_00000.tokens   uint16 (vocab <= 65536) or uint32, documents back to back
    data_dir/{train,eval}/shard_00000.mask     uint8 loss mask (chat data only: 1 on assistant tokens)

Each document ends with `<|endoftext|>`. The held-out split is `eval_files` when given, otherwise
each document whose CRC32 falls in the lowest ``heldout_fraction`` of the range: stable under
reordering and re-runs. A directory whose fingerprint (in `meta.json`) matches is reused. Otherwise
`meta.json` is deleted *before* the first shard is replaced, the shards are written under a temporary
name, fsynced and renamed, and the new `meta.json` is renamed into place last: a preparation killed
half-way leaves no fingerprint, so the next run redoes it rather than reusing a mix of two inputs'
shards under the old fingerprint (issue 13).

`PackedData` cuts a split into windows of ``seq_len + 1`` tokens (inputs and shifted targets; windows
never straddle shards) and serves them in a seeded permutation per epoch. The position is one integer,
the number of windows served, so a checkpoint stores it and a resumed run reads the same batches.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sambay.tokenizer import Tokenizer
from sambay.train.chat import encode_chat
from sambay.train.progress import Reporter

SHARD_TOKENS = 1 << 26  # 64M tokens (128 MB of uint16) per shard


def _documents(path: Path) -> Iterator[tuple[str, object]]:
    """Yields ("text", str) or ("chat", messages) for each document of one file."""
    if path.suffix != ".jsonl":
        yield "text", path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "messages" in record:
                yield "chat", record["messages"]
            elif "text" in record:
                yield "text", record["text"]
            else:
                raise ValueError(f"{path}: each JSONL line needs a 'text' or a 'messages' field")


def _fingerprint(files: list[str], eval_files: list[str], heldout: float, tokenizer: Tokenizer) -> str:
    stats = [(str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files + eval_files]
    return json.dumps({"files": stats, "eval": len(eval_files), "heldout": heldout, "vocab": tokenizer.vocab_size,
                       "markers": [t.content for t in tokenizer.added_tokens]})


class _ShardWriter:
    """Appends token ids (and masks) to numbered shard files of one split."""

    def __init__(self, root: Path, dtype: np.dtype, with_mask: bool):
        self.root, self.dtype, self.with_mask = root, dtype, with_mask
        root.mkdir(parents=True, exist_ok=True)
        self.tokens: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[int] = []
        self.n_bytes = 0

    def add(self, ids: list[int], mask: list[int] | None, n_bytes: int) -> None:
        self.tokens.append(np.asarray(ids, dtype=self.dtype))
        if self.with_mask:
            self.masks.append(np.asarray(mask if mask is not None else [1] * len(ids), dtype=np.uint8))
        self.pending += len(ids)
        self.n_bytes += n_bytes
        if self.pending >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard_{len(self.shards):05d}"
        _atomic_tofile(np.concatenate(self.tokens), self.root / f"{name}.tokens")
        if self.with_mask:
            _atomic_tofile(np.concatenate(self.masks), self.root / f"{name}.mask")
        self.shards.append(self.pending)
        self.tokens, self.masks, self.pending = [], [], 0


def _atomic_tofile(array: np.ndarray, path: Path) -> None:
    _atomic_write(path, array.tofile)


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary beside ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(directory: Path) -> None:
    """Makes the renames and deletions in ``directory`` durable (also used by the checkpoints, `train.state`)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_data(
    files: list[str], tokenizer: Tokenizer, data_dir: str | Path, *, eval_files: list[str] = (),
    heldout_fraction: float = 0.01, report: Reporter | None = None,
) -> Path:
    """Tokenizes ``files`` into shards under ``data_dir`` (skipped when already done for these inputs).

    Args:
        files: training documents (see the module docstring for the formats).
        tokenizer: its `<|endoftext|>` ends every document; chats use its template.
        data_dir: output directory.
        eval_files: held-out documents; when empty, ``heldout_fraction`` of ``files`` is held out.
        heldout_fraction: see above.
        report: says whether the shards are reused or written, with a bar over the input bytes on a
            terminal (default: silent).

    Returns:
        ``data_dir``.
    """
    data_dir, eval_files, report = Path(data_dir), list(eval_files), report or Reporter()
    fingerprint = _fingerprint(list(files), eval_files, heldout_fraction, tokenizer)
    meta_path = data_dir / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text())["fingerprint"] == fingerprint:
        report.say(f"data: reusing the token shards in {data_dir} (same input files)")
        return data_dir
    if meta_path.exists():  # invalidate before any shard changes: a kill from here on leaves no fingerprint
        meta_path.unlink()
        fsync_dir(data_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    is_chat = next(_documents(Path([*files, *eval_files][0])), ("text", ""))[0] == "chat"
    writers = {s: _ShardWriter(data_dir / s, dtype, is_chat) for s in ("train", "eval")}
    total, t0 = sum(os.path.getsize(f) for f in [*files, *eval_files]), time.perf_counter()
    report.say(f"data: tokenizing {len(files) + len(eval_files)} file(s), {total / 1e6:,.1f} MB, into {data_dir}")
    with report.task("tokenizing", total) as advance:
        for path, fixed_split in [*((f, None) for f in files), *((f, "eval") for f in eval_files)]:
            for kind, doc in _documents(Path(path)):
                ids, mask, n_bytes = _encode(tokenizer, kind, doc)
                split = fixed_split or _split_of(doc, heldout_fraction if not eval_files else 0.0)
                writers[split].add(ids, mask, n_bytes)
            advance(os.path.getsize(path))
    for writer in writers.values():
        writer.flush()
    report.say(f"data: {sum(writers['train'].shards):,} train and {sum(writers['eval'].shards):,} held-out tokens "
               f"in {time.perf_counter() - t0:.0f} s")
    token_bytes = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int32)
    token_bytes[list(tokenizer.marker_ids)] = 0  # markers are structure, not text: no bytes, no bits
    _atomic_write(data_dir / "token_bytes.npy", lambda f: np.save(f, token_bytes))
    for split in writers:
        fsync_dir(data_dir / split)  # the shards' renames are on disk before the fingerprint that vouches for them
    meta = {"fingerprint": fingerprint, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "chat": is_chat,
            "splits": {s: {"shards": w.shards, "bytes": w.n_bytes} for s, w in writers.items()}}
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))
    return data_dir


def _encode(tokenizer: Tokenizer, kind: str, doc) -> tuple[list[int], list[int] | None, int]:
    if kind == "chat":
        ids, mask = encode_chat(tokenizer, doc)
        return ids, mask, sum(len(m["content"].encode("utf-8")) for m in doc)
    return [*tokenizer.encode(doc), tokenizer.eos_token_id], None, len(doc.encode("utf-8"))


def _split_of(doc, fraction: float) -> str:
    key = json.dumps(doc, sort_keys=True).encode("utf-8")
    return "eval" if zlib.crc32(key) < fraction * 2**32 else "train"


@dataclass
class Batch:
    """One micro-batch: inputs (b, t) and targets (b, t) int64, loss mask (b, t) bool."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(x.to(device, non_blocking=True) for x in (self.inputs, self.targets, self.mask)))


class PackedData:
    """Fixed-length windows over one split of a prepared data directory.

    Args:
        data_dir: made by `prepare_data`.
        split: "train" or "eval".
        seq_len: tokens per window (each window reads seq_len + 1 tokens).
        seed: seeds the per-epoch permutation; ``shuffle=False`` serves windows in order.
    """

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, *, seed: int = 0, shuffle: bool = True):
        data_dir = Path(data_dir)
        meta = json.loads((data_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        self.seq_len, self.seed, self.shuffle = seq_len, seed, shuffle
        self.tokens, self.masks, counts = [], [], []
        for i, n in enumerate(meta["splits"][split]["shards"]):
            self.tokens.append(np.memmap(data_dir / split / f"shard_{i:05d}.tokens", dtype=dtype, mode="r"))
            if meta["chat"]:
                self.masks.append(np.memmap(data_dir / split / f"shard_{i:05d}.mask", dtype=np.uint8, mode="r"))
            counts.append(max((n - 1) // seq_len, 0))
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_windows = int(self.starts[-1])
        if self.n_windows == 0:
            raise ValueError(f"the {split} split of {data_dir} holds fewer than {seq_len + 1} tokens")
        self.token_bytes = torch.from_numpy(np.load(data_dir / "token_bytes.npy")).long()
        self._epoch, self._order = -1, None

    def _window(self, index: int) -> int:
        """The window at global position ``index`` (epochs repeat the split, each in its own order)."""
        epoch, pos = divmod(index, self.n_windows)
        if not self.shuffle:
            return pos
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._order[pos])

    def batch(self, first: int, size: int) -> Batch:
        """Windows at positions ``first .. first + size - 1`` as one batch."""
        rows, masks = [], []
        for index in range(first, first + size):
            window = self._window(index)
            shard = int(np.searchsorted(self.starts, window, side="right") - 1)
            offset = (window - int(self.starts[shard])) * self.seq_len
            rows.append(np.asarray(self.tokens[shard][offset : offset + self.seq_len + 1], dtype=np.int64))
            if self.masks:
                masks.append(np.asarray(self.masks[shard][offset + 1 : offset + self.seq_len + 1], dtype=bool))
        data = torch.from_numpy(np.stack(rows))  # (b, t + 1)
        mask = torch.from_numpy(np.stack(masks)) if masks else torch.ones(size, self.seq_len, dtype=torch.bool)
        return Batch(data[:, :-1].contiguous(), data[:, 1:].contiguous(), mask)
