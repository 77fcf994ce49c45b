"""Split a reasoning model's output into its reasoning trace and its answer.

Phi-4-mini-flash-reasoning writes `<think>reasoning</think>answer`, with the tags as plain text
(they are not special tokens). `split_reasoning` parses a finished string; `ReasoningParser` parses a
stream of text deltas and returns reasoning/content deltas, so a server can fill the
`reasoning_content` and `content` fields of OpenAI-style chunks as tokens arrive.

Rules (the one-shot and the streaming parser follow them identically):
- Text before the first `<think>` is content; with no `<think>` at all, everything is content.
- Everything after `<think>` up to the first `</think>` is reasoning, kept verbatim; an unterminated
  block is all reasoning.
- After `</think>`, newlines (`\\n`, `\\r`) at the start of the answer are dropped, as reasoning
  servers (vLLM, SGLang, Ollama) present the answer: the model writes `</think>\\n\\nThe answer...`.
  Other leading whitespace is kept. Later `<think>` / `</think>` strings are ordinary content.
- `start_in_reasoning=True` is for templates that open the block in the prompt (the generation then
  starts inside it); this model's template does not.

Streaming holds back only a suffix that could still become the tag being looked for (`"<th"`); it is
released as soon as the next delta shows it is not a tag, or by `finish()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_ANSWER_LEADING = "\r\n"


class _State(Enum):
    BEFORE = "before"  # content, looking for <think>
    THINKING = "thinking"  # reasoning, looking for </think>
    ANSWER = "answer"  # content until the end


@dataclass(frozen=True)
class ReasoningSplit:
    """Reasoning text and answer text: whole texts from `split_reasoning`, deltas from the parser."""

    reasoning: str = ""
    content: str = ""


def split_reasoning(text: str, *, start_in_reasoning: bool = False) -> ReasoningSplit:
    """Splits a complete model output into reasoning and answer (rules in the module docstring).

    Args:
        text: the decoded generation.
        start_in_reasoning: the prompt already opened the think block.

    Returns:
        The reasoning trace and the answer.
    """
    before, rest = "", text
    if not start_in_reasoning:
        open_at = text.find(THINK_OPEN)
        if open_at < 0:
            return ReasoningSplit(content=text)
        before, rest = text[:open_at], text[open_at + len(THINK_OPEN) :]
    close_at = rest.find(THINK_CLOSE)
    if close_at < 0:
        return ReasoningSplit(reasoning=rest, content=before)
    answer = rest[close_at + len(THINK_CLOSE) :].lstrip(_ANSWER_LEADING)
    return ReasoningSplit(reasoning=rest[:close_at], content=before + answer)


class ReasoningParser:
    """Incremental `split_reasoning`: feed text deltas, get reasoning/content deltas.

    Args:
        start_in_reasoning: the prompt already opened the think block.

    Example:
        >>> parser = ReasoningParser()
        >>> parser.feed("<th")
        ReasoningSplit(reasoning='', content='')
        >>> parser.feed("ink>2+2</thi")
        ReasoningSplit(reasoning='2+2', content='')
        >>> parser.feed("nk>\\n4")
        ReasoningSplit(reasoning='', content='4')
    """

    def __init__(self, *, start_in_reasoning: bool = False):
        self._state = _State.THINKING if start_in_reasoning else _State.BEFORE
        self._held = ""  # a suffix that may be the start of the tag we are looking for
        self._strip_answer = True  # drop newlines until the answer's first other character

    @property
    def in_reasoning(self) -> bool:
        """True while inside the think block (the next text would be reasoning)."""
        return self._state == _State.THINKING

    def feed(self, delta: str) -> ReasoningSplit:
        """Consumes one text delta.

        Args:
            delta: the next piece of generated text (any length, any split point).

        Returns:
            The reasoning and content text this delta released.
        """
        reasoning, content = [], []
        text, self._held = self._held + delta, ""
        while text:
            if self._state == _State.ANSWER:
                if self._strip_answer:
                    text = text.lstrip(_ANSWER_LEADING)
                    self._strip_answer = not text
                content.append(text)
                break
            tag = THINK_OPEN if self._state == _State.BEFORE else THINK_CLOSE
            out = content if self._state == _State.BEFORE else reasoning
            found = text.find(tag)
            if found >= 0:
                out.append(text[:found])
                text = text[found + len(tag) :]
                self._state = _State.THINKING if self._state == _State.BEFORE else _State.ANSWER
                continue
            keep = _partial_tag_length(text, tag)
            out.append(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        return ReasoningSplit(reasoning="".join(reasoning), content="".join(content))

    def finish(self) -> ReasoningSplit:
        """Ends the stream, releasing a held partial tag as the text it turned out to be."""
        held, self._held = self._held, ""
        if self._state == _State.THINKING:
            return ReasoningSplit(reasoning=held)
        return ReasoningSplit(content=held)


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0
