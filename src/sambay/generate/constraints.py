"""What a row's next token may be: reasoning budgets, and structured outputs that start after the reasoning.

Phi-4-mini-flash-reasoning answers a chat prompt with ``<think>\\n`` reasoning ``</think>\\n`` answer; the tags
are plain text (o200k tokens ``<th`` ``ink`` ``>\\n`` and ``</`` ``think`` ``>\\n``), so where a row stands is
read from the bytes of its tokens (`ThinkTracker`, the byte-level twin of `sambay.text.reasoning`'s parser).
A `Guide` per row of a reasoning request (``SamplingParams.reasoning``), or of a request with a grammar,
follows its tokens and says what the next one may be:

- a budget (``max_reasoning_tokens``): once the block holds that many tokens, the model's own close
  ``</think>\\n`` is forced token by token, and the answer follows. The newline belongs to the close because
  the model writes ``>\\n`` as one token: forcing ``</think>`` alone would end on ``>``, a token it never
  writes there. A budget of 0 forces ``<think>\\n</think>\\n`` at once: this model's generation prompt is
  ``<|assistant|>`` alone, so the model opens the block itself, and skipping the reasoning means writing
  an empty block, not only a close;
- a grammar (``guided``): the think block is left to the model, which may not end it with a stop token
  there (the answer would be missing), and once ``</think>`` is written the grammar's mask applies; when
  the model has written ``</think`` the engine completes it with ``>\\n`` so that the grammar starts on
  a fresh line whatever token the model would have ended the tag with. Text after the tag in the token that
  completes it (newlines aside, which the answer drops) is fed to the grammar. A request whose prompt
  already holds the whole block, or that is not a reasoning request, is constrained from its first token;
- a reasoning request with a budget or a grammar has ``<think>\\n`` forced as its first tokens, which the
  model writes anyway, so that the block where the budget counts and after which the grammar starts is
  certain.

``reasoning_tokens`` counts the tokens that start inside the block, tags excluded, so that it never exceeds
the budget; completion tokens = tags + reasoning tokens + answer tokens.

A decision is a `Force` (one allowed token), a `Ban` (all but some tokens) or the grammar's matcher (its
mask, computed with the other rows' by `GrammarCompiler.fill_bitmasks`); `step_bitmask` writes a step's
decisions as rows of int32 bitmask words for `sambay.generate.sampling.apply_token_bitmask`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from sambay.generate.guided import GrammarCompiler

OPEN, CLOSE = b"<think>", b"</think>"
OPEN_TEXT, CLOSE_TEXT = "<think>\n", "</think>\n"  # as the model writes them (module docstring)
_ANSWER_LEADING = b"\r\n"  # dropped from the answer's start, as `sambay.text.reasoning` does


class Phase(Enum):
    BEFORE = "before"  # no <think> yet
    THINKING = "thinking"  # inside the block
    ANSWER = "answer"  # after </think>


class ThinkTracker:
    """Where a row stands relative to its think block, and how many tokens started inside it.

    A suffix that may be the start of the tag looked for is held back (with the offsets where tokens start
    in it), as `sambay.text.reasoning.ReasoningParser` holds text: tokens that turn out to be part of the
    close tag are not reasoning tokens.
    """

    def __init__(self):
        self.phase = Phase.BEFORE
        self.held = b""  # a suffix that is a proper prefix of the tag looked for
        self.held_starts: list[int] = []  # offsets in `held` where tokens inside the block start
        self.reasoning = 0  # tokens that started inside the block and are not part of the close tag

    @property
    def tentative(self) -> int:
        """Reasoning tokens, counting those held back as a possible close tag."""
        return self.reasoning + (len(self.held_starts) if self.phase is Phase.THINKING else 0)

    def feed(self, data: bytes) -> bytes | None:
        """Account for one token's bytes; returns the bytes after ``</think>`` when this token completes it."""
        if self.phase is Phase.ANSWER:
            return None
        text, starts = self.held + data, [*self.held_starts, len(self.held)]
        while True:
            tag = OPEN if self.phase is Phase.BEFORE else CLOSE
            at = text.find(tag)
            if at < 0:
                keep = _partial_tag_length(text, tag)
                cut = len(text) - keep
                if self.phase is Phase.THINKING:
                    self.reasoning += sum(s < cut for s in starts)
                self.held, self.held_starts = text[cut:], [s - cut for s in starts if s >= cut]
                return None
            end = at + len(tag)
            if self.phase is Phase.THINKING:
                self.reasoning += sum(s < at for s in starts)
                self.phase, self.held, self.held_starts = Phase.ANSWER, b"", []
                return text[end:]
            self.phase = Phase.THINKING  # the opener's tokens started before the block: not counted
            text, starts = text[end:], [s - end for s in starts if s >= end]


def _partial_tag_length(text: bytes, tag: bytes) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass(frozen=True)
class Force:
    """Only ``token`` may come next."""

    token: int


@dataclass(frozen=True)
class Ban:
    """Anything but ``tokens`` may come next."""

    tokens: tuple[int, ...]


class Guide:
    """One row's think block, budget and grammar: what it forces or allows next (module docstring).

    Args:
        token_bytes: id → the token's bytes.
        encode: text → ids (to force the model's own tags).
        reasoning: the output opens a think block (a reasoning request); False: all of it is the answer.
        budget: the most reasoning tokens (None: no bound).
        matcher: the row's `llguidance.LLMatcher` (None: no grammar), from ``compiler``.
        compiler: the grammar's compiler (its tokenizer turns answer bytes into tokens).
        stop_ids: the row's stop tokens (banned inside the block of a grammar row).
    """

    def __init__(self, *, token_bytes: Callable[[int], bytes], encode: Callable[[str], list[int]], reasoning: bool,
                 budget: int | None = None, matcher: Any = None, compiler: GrammarCompiler | None = None,
                 stop_ids: Sequence[int] = ()):
        self.token_bytes, self.encode = token_bytes, encode
        self.tracker = ThinkTracker() if reasoning else None
        self.budget, self.matcher, self.compiler = budget, matcher, compiler
        self.stop_ids = tuple(sorted(stop_ids))
        self.controls = budget is not None or matcher is not None  # may force or mask tokens
        self.forced: deque[int] = deque()
        self.started = False  # `begin` has read the prompt

    @property
    def phase(self) -> Phase:
        return Phase.ANSWER if self.tracker is None else self.tracker.phase

    @property
    def reasoning_tokens(self) -> int:
        return 0 if self.tracker is None else self.tracker.tentative

    def begin(self, prompt_tail: bytes) -> None:
        """Start from what the prompt already wrote of the reply (the bytes after its last marker)."""
        self.started = True
        if self.tracker is not None and prompt_tail:
            self._answer(self.tracker.feed(prompt_tail))
            self.tracker.reasoning, self.tracker.held_starts = 0, []  # prompt bytes are not generated tokens

    def accept(self, token: int) -> None:
        """Account for the row's next generated token."""
        if self.forced:
            self.forced.popleft()
        if self.phase is Phase.ANSWER:
            if self.matcher is not None and not self.matcher.is_stopped():
                self.matcher.consume_token(token)
            return
        self._answer(self.tracker.feed(self.token_bytes(token)))

    def _answer(self, rest: bytes | None) -> None:
        """The close tag was just completed: what followed it in the same token starts the answer."""
        rest = (rest or b"").lstrip(_ANSWER_LEADING)
        if rest and self.matcher is not None:
            self.matcher.consume_tokens(self.compiler.tokenizer.tokenize_bytes(rest))

    def may_need_mask(self, lookahead: int = 1) -> bool:
        """Whether the next token can be constrained if ``lookahead`` more tokens arrive first (False: it is
        free whatever they are, so the step may be planned before they are known)."""
        if not self.controls:
            return False
        if self.forced or (self.phase is Phase.ANSWER and self.matcher is not None):
            return True
        if self.phase is Phase.BEFORE:
            return True
        if self.phase is Phase.THINKING:
            return self.matcher is not None or (self.budget is not None and
                                                self.tracker.tentative + lookahead >= self.budget)
        return False

    def next(self) -> Force | Ban | Any | None:
        """What the next token may be: a `Force`, a `Ban`, the grammar's matcher, or None (anything)."""
        if not self.forced:
            self._plan_forcing()
        if self.forced:
            return Force(self.forced[0])
        if self.phase is Phase.ANSWER:
            return self.matcher
        if self.phase is Phase.THINKING and self.matcher is not None:
            return Ban(self.stop_ids)
        return None

    def _plan_forcing(self) -> None:
        """Queue the tokens of a tag the row must write now, if any."""
        t, text = self.tracker, ""
        if t is None or not self.controls:
            return
        if t.phase is Phase.BEFORE:
            text = (OPEN_TEXT + (CLOSE_TEXT if self.budget == 0 else ""))[len(t.held):]
        elif t.phase is Phase.THINKING and ((self.budget is not None and t.tentative >= self.budget)
                                            or (self.matcher is not None and t.held == CLOSE[:-1])):
            text = CLOSE_TEXT[len(t.held):]
        if text:
            self.forced.extend(self.encode(text))


def step_bitmask(decisions: Sequence[Force | Ban | Any], compiler: GrammarCompiler | None,
                 words: int) -> np.ndarray:
    """The decisions of a step's constrained rows as a (len(decisions), words) int32 bitmask (bit ``i % 32``
    of word ``i // 32`` allows token i); the grammar rows' masks are computed together, off the GIL."""
    bits = np.zeros((len(decisions), words), dtype=np.uint32)
    grammar = []
    for row, decision in enumerate(decisions):
        if isinstance(decision, Force):
            bits[row, decision.token >> 5] |= np.uint32(1 << (decision.token & 31))
        elif isinstance(decision, Ban):
            bits[row] = np.uint32(0xFFFFFFFF)
            for token in decision.tokens:
                bits[row, token >> 5] &= ~np.uint32(1 << (token & 31))
        else:
            grammar.append((decision, row))
    mask = bits.view(np.int32)
    if grammar:
        compiler.fill_bitmasks(grammar, mask)
    return mask
