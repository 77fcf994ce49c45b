"""Sampled token ids → what a caller sees: text deltas, stop conditions, logprobs.

The `OutputProcessor` is the one place that turns a row's tokens into `SequenceDelta`s, for the
server and the offline `Engine` alike: incremental detokenization, stop token ids (they count as
generated tokens but add no text), stop strings (cut from the text, `stops.py`), the length limit,
and logprobs. The reasoning split (`<think>`) is applied to these deltas by the server's protocol layer
(`sambay.text.reasoning`), which also serves `sambay generate`.

It also owns each row's `Guide` (`sambay.generate.constraints`: the think block, the reasoning budget, the
grammar): the guide follows the row's tokens here, its count of reasoning tokens goes out in the row's
last delta, and `bitmask` turns the guides of a step's rows into the token masks the sampler applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sambay.generate.constraints import Guide, step_bitmask
from sambay.generate.guided import GrammarCompiler, grammar_compiler
from sambay.generate.sampling import SamplingParams
from sambay.generate.stops import StopStringMatcher
from sambay.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token, and the most likely alternatives (see `sampling`)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SequenceDelta:
    """What one step added to one sequence."""

    index: int  # prompt_index * n + sample_index
    prompt_index: int
    sample_index: int
    token_id: int
    text: str  # text released by this step (may be "", e.g. while a stop-string prefix is held back)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" or "length" in the sequence's last delta
    reasoning_tokens: int | None = None  # in the last delta: tokens inside <think> (0 unless a reasoning request)


class SequenceState:
    """Host-side state of one row: token count, detokenizer, stop strings, finish reason, and its `Guide`
    (reasoning requests and grammars only)."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: frozenset[int], limit: int,
                 guide: Guide | None = None):
        self.detok = tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens) if tokenizer else None
        self.matcher = StopStringMatcher(params.stop)
        self.stop_ids, self.limit = stop_ids, limit
        self.guide = guide
        self.generated = 0
        self.finish_reason: str | None = None

    @property
    def reasoning_tokens(self) -> int:
        return 0 if self.guide is None else self.guide.reasoning_tokens

    def advance(self, token: int) -> str:
        """Account for one generated token; returns the text it releases and sets `finish_reason`."""
        self.generated += 1
        if self.guide is not None:
            self.guide.accept(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self._release()
        text, stopped = self.matcher.feed(self.detok.push(token)) if self.detok else ("", False)
        if stopped:
            self.finish_reason = "stop"
        elif self.generated >= self.limit:
            self.finish_reason = "length"
            text += self._release()
        return text

    def _release(self) -> str:
        if self.detok is None:
            return ""
        text, _ = self.matcher.feed(self.detok.finish())
        return text + self.matcher.flush()


class OutputProcessor:
    """Makes each row's `SequenceState` and turns its sampled tokens into deltas.

    Args:
        tokenizer: for text and stop strings (None: token ids only).
        stop_token_ids: stop ids of requests that name none.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop_token_ids: Sequence[int]):
        self.tokenizer, self.stop_token_ids = tokenizer, frozenset(stop_token_ids)

    def check(self, params: SamplingParams) -> None:
        """Raises ValueError for a request this processor cannot guide (an invalid grammar, no tokenizer)."""
        if (params.reasoning or params.guided is not None) and self.tokenizer is None:
            raise ValueError("reasoning budgets and grammars read the tokens' text: the engine needs a tokenizer")
        if params.guided is not None:
            self._compiler().check(params.guided)

    def sequence(self, params: SamplingParams, limit: int) -> SequenceState:
        """The state of a new row that may generate ``limit`` tokens."""
        stop_ids = self.stop_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        guide = None
        if params.reasoning or params.guided is not None:
            compiler = self._compiler() if params.guided is not None else None
            if compiler is not None:  # a grammar row ends when its grammar does, whatever its own stop ids
                stop_ids = stop_ids | frozenset(compiler.stop_ids)
            guide = Guide(token_bytes=self.tokenizer.token_bytes, encode=self.tokenizer.encode,
                          reasoning=params.reasoning, budget=params.max_reasoning_tokens,
                          matcher=compiler.matcher(params.guided) if compiler else None, compiler=compiler,
                          stop_ids=stop_ids)
        return SequenceState(self.tokenizer, params, stop_ids, limit, guide)

    def begin(self, seq: SequenceState, prompt: Sequence[int]) -> None:
        """Start a new row's guide from its prompt: the reply so far is the text after the prompt's last marker
        (empty for a chat prompt, ``<think>...</think>`` for one that skips the reasoning)."""
        if seq.guide is None or seq.guide.started:
            return
        markers = self.tokenizer.marker_ids
        tail = len(prompt)
        while tail and prompt[tail - 1] not in markers:
            tail -= 1
        seq.guide.begin(b"".join(self.tokenizer.token_bytes(t) for t in prompt[tail:]))

    def delta(self, seq: SequenceState, sample_index: int, token: int, logprob: TokenLogprob | None) -> SequenceDelta:
        """Account for one sampled token of sample ``sample_index``; sets the finish reason when it ends the row."""
        text = seq.advance(token)
        reasoning = seq.reasoning_tokens if seq.finish_reason else None
        return SequenceDelta(sample_index, 0, sample_index, token, text, logprob, seq.finish_reason, reasoning)

    @staticmethod
    def may_constrain(guides: Sequence[Guide | None]) -> bool:
        """Whether a mask may apply to one of these rows' next tokens, even if each has one more token in
        flight (False: the step can be sampled without waiting for them)."""
        return any(g is not None and g.controls and g.may_need_mask() for g in guides)

    def bitmask(self, guides: Sequence[Guide | None]) -> tuple[list[int], np.ndarray] | None:
        """The token masks of a step's rows, from guides that have seen every token of their rows: (the
        positions in ``guides`` of the constrained rows, their (m, words) int32 bitmask), or None if none is."""
        decisions = [(i, d) for i, g in enumerate(guides) if g is not None and (d := g.next()) is not None]
        if not decisions:
            return None
        words = -(-self.tokenizer.vocab_size // 32)
        compiler = self._compiler() if any(g is not None and g.matcher is not None for g in guides) else None
        return [i for i, _ in decisions], step_bitmask([d for _, d in decisions], compiler, words)

    def _compiler(self) -> GrammarCompiler:
        return grammar_compiler(self.tokenizer, sorted(self.stop_token_ids))


def token_logprobs(tokens: list[int], chosen: list[float], top_ids: list[list[int]],
                   top_values: list[list[float]]) -> list[TokenLogprob]:
    """Host lists of a sampled batch (see `sambay.generate.sampling.Sampled`) → one `TokenLogprob` per row."""
    return [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
            for t, c, i, v in zip(tokens, chosen, top_ids, top_values, strict=True)]
