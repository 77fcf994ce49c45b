"""Structured outputs: the grammar a request's answer must follow, compiled for one tokenizer by llguidance.

`GuidedDecoding` names the grammar the way vLLM's guided decoding does: a JSON schema, any JSON object,
a regular expression, or a choice among strings. `GrammarCompiler` turns it into an llguidance grammar
over the tokenizer's byte strings, checks it once (an invalid schema, an unsupported regex feature, or a
regex that no string the model can write satisfies: a `ValueError` saying why), keeps the checked
matcher as a template, and hands each row a copy. `fill_bitmasks` computes the token masks of all the
constrained rows of a step in one call that leaves the GIL (llguidance's thread pool); when that happens
relative to the GPU work is `sambay.generate.core`'s business (its module docstring).

Why llguidance rather than xgrammar: both were measured on this model's o200k vocabulary (200,029
tokens, the byte strings of `sambay.tokenizer`), on a busy 2-core CPU, llguidance 1.9.1 / xgrammar 0.2.9:

    |                                      | llguidance                  | xgrammar                            |
    | install next to a CPU torch          | one 3.1 MB wheel, no deps   | + transformers (129 MB unpacked),   |
    |                                      |                             |   apache-tvm-ffi (13 MB), triton    |
    | tokenizer set-up (once per process)  | 2-3 s                       | 0.3 s                               |
    | compile: JSON schema / any object    | 3-12 ms / 1-5 ms            | 260-340 ms / 230-260 ms             |
    | compile: regex / choice              | 6-11 ms / 1-3 ms            | 1-12 ms / 0.5-3 ms                  |
    | mask of one row, mean over a JSON    | 40-130 us                   | 5-30 us                             |
    | masks of 64 rows in one batched call | 1.0 ms                      | 1.7-6 ms                            |

xgrammar computes a single mask faster, because it precomputes per-state token sets when it compiles,
but that compile costs a third of a second per new JSON schema, paid on the request path (time to first
token) by every client that sends its own schema; llguidance compiles in milliseconds, computes 64 rows'
masks in about 1 ms on its own threads (a fraction of the ~10 ms decode step they overlap on an H200), and
installs as one small wheel, which keeps `torch` the only heavy dependency (xgrammar requires transformers
and, on Linux, triton). Both masks are the same bit layout (int32 words, bit ``i % 32`` of word ``i // 32``).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sambay.tokenizer import Tokenizer

# JSON as `json.dumps` writes it: one space after ":" and ",", no other whitespace. llguidance's default allows
# any run of whitespace before and between values, and a small model, whose first wish after </think> is a
# newline, then writes newlines until its length limit (seen with the embedded model). A schema may still
# choose its own layout through llguidance's "x-guidance" key.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

GRAMMAR_EXTRA = "structured outputs need the grammar extra: pip install 'sambay[grammar]' (llguidance)"


@dataclass(frozen=True)
class GuidedDecoding:
    """The grammar a request's answer follows: exactly one of the fields (vLLM's guided_* names).

    Build a JSON-schema one with `GuidedDecoding.from_schema(dict)`; the schema is kept as JSON text so that
    the object stays immutable and hashable (compiled grammars are cached by it).
    """

    json_schema: str | None = None  # a JSON Schema, as JSON text
    json_object: bool = False  # any JSON object ({"type": "object"})
    regex: str | None = None  # the whole answer matches it
    choice: tuple[str, ...] | None = None  # the answer is exactly one of these strings

    def __post_init__(self):
        given = [self.json_schema is not None, self.json_object, self.regex is not None, self.choice is not None]
        if sum(given) != 1:
            raise ValueError("guided decoding takes exactly one of json_schema, json_object, regex, choice")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError(f"a JSON schema is an object (or a boolean), got {type(schema).__name__}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence):
                raise ValueError("choice must be a sequence of strings")
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"choice needs at least one non-empty string, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    @staticmethod
    def from_schema(schema: Mapping[str, Any] | bool) -> GuidedDecoding:
        """A JSON-schema grammar from a parsed schema."""
        return GuidedDecoding(json_schema=json.dumps(schema))

    @property
    def kind(self) -> str:
        """Which grammar this is, as the error messages name it."""
        if self.json_schema is not None:
            return "json_schema"
        return "json_object" if self.json_object else "regex" if self.regex is not None else "choice"

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form) of this request."""
        from llguidance import LLMatcher

        if self.json_schema is not None or self.json_object:
            schema = self.json_schema if self.json_schema is not None else {"type": "object"}
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        # Lark string literals read JSON string escapes, so json.dumps quotes any text exactly
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))


class _TokenizerView:
    """What `llguidance.TokenizerWrapper` reads from a tokenizer: every id's bytes, the markers, encode."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.marker_ids)  # control tokens, never text
        self.eos_token_id, self.bos_token_id = stop_ids[0], None

    def __call__(self, text: bytes) -> list[int]:
        return self._tokenizer.encode(text.decode("utf-8", errors="replace"))


class GrammarCompiler:
    """Compiles, checks and caches `GuidedDecoding`s for one tokenizer; makes each row's matcher.

    Args:
        tokenizer: the model's tokenizer (every id's byte string goes to llguidance).
        stop_ids: the tokens that end an answer once its grammar is complete (the engine's stop ids).
    """

    cache_size = 256  # checked grammars kept (a client usually reuses a handful of schemas)

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]):
        try:
            import llguidance
        except ImportError as e:
            raise ValueError(f"{GRAMMAR_EXTRA} ({e})") from None
        if not stop_ids:
            raise ValueError("structured outputs need a stop token id to end the answer; the tokenizer has none")
        self.stop_ids = tuple(stop_ids)
        self.vocab_size = tokenizer.vocab_size
        self.words = -(-self.vocab_size // 32)  # int32 words of one row's bitmask
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerView(tokenizer, stop_ids)),
                                                eos_token=list(self.stop_ids))
        self._executor = llguidance.LLExecutor()
        self._templates: OrderedDict[GuidedDecoding, Any] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, guided: GuidedDecoding) -> None:
        """Raises ValueError (with the reason) for a grammar that cannot be used."""
        self._template(guided)

    def matcher(self, guided: GuidedDecoding):
        """A fresh `llguidance.LLMatcher` for one row (a copy of the checked template)."""
        template = self._template(guided)
        with self._lock:
            return template.deep_copy()

    def _template(self, guided: GuidedDecoding):
        with self._lock:
            if guided in self._templates:
                self._templates.move_to_end(guided)
                return self._templates[guided]
        template = self._compile(guided)
        with self._lock:
            self._templates[guided] = template
            while len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        return template

    def _compile(self, guided: GuidedDecoding):
        from llguidance import LLMatcher

        try:
            grammar = guided.grammar()
        except ValueError as e:
            raise ValueError(f"invalid {guided.kind}: {e}") from None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"invalid {guided.kind}: {_first_lines(messages[0])}")
        template = LLMatcher(self.tokenizer, grammar, log_level=0)
        probe = template.deep_copy()
        mask = np.zeros((1, self.words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(probe, 0)], mask.ctypes.data, self.words * 4, 1)
        if template.is_error() or probe.is_error():  # e.g. a regex whose language is empty
            raise ValueError(f"unsatisfiable {guided.kind}: no text the model can write matches it")
        return template

    def fill_bitmasks(self, matchers: list[tuple[Any, int]], bitmask: np.ndarray) -> None:
        """Write each matcher's next-token mask into row ``index`` of ``bitmask`` ((k, words) int32, C order),
        all rows in one call on llguidance's threads (the GIL is released)."""
        if matchers:
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, self.words * 4, bitmask.shape[0])


def _first_lines(message: str, lines: int = 6) -> str:
    """An llguidance error without its trailing parser dump."""
    return "\n".join(message.strip().splitlines()[:lines])


_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], GrammarCompiler]] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def grammar_compiler(tokenizer: Tokenizer, stop_ids: Sequence[int] | None = None) -> GrammarCompiler:
    """The one `GrammarCompiler` of this tokenizer and stop ids, built on first use (2-3 s for 200K tokens).

    ``stop_ids`` None: any compiler this tokenizer already has (checking a grammar does not depend on them),
    else one for the tokenizer's own stop ids."""
    with _COMPILERS_LOCK:
        compilers = _COMPILERS.setdefault(tokenizer, {})
        if stop_ids is None:
            if compilers:
                return next(iter(compilers.values()))
            stop_ids = sorted(tokenizer.stop_token_ids())
        key = tuple(stop_ids)
        if key not in compilers:
            compilers[key] = GrammarCompiler(tokenizer, key)
        return compilers[key]
