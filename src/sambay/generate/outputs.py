"""Sampled token ids → what a caller sees: text deltas, stop conditions, logprobs.

The `OutputProcessor` is the one place that turns a row's tokens into `SequenceDelta`s, for the
server and the offline `Engine` alike: incremental detokenization, stop token ids (they count as
generated tokens but add no text), stop strings (cut from the text, `stops.py`), the length limit,
and logprobs. The reasoning split (`<think>`) is applied to these deltas by the server's protocol layer
(`sambay.text.reasoning`), which also serves `sambay generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


class SequenceState:
    """Host-side state of one row: token count, detokenizer, stop strings, finish reason."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: frozenset[int], limit: int):
        self.detok = tokenizer.detokenizer(skip_special_tokens=params.skip_special_tokens) if tokenizer else None
        self.matcher = StopStringMatcher(params.stop)
        self.stop_ids, self.limit = stop_ids, limit
        self.generated = 0
        self.finish_reason: str | None = None

    def advance(self, token: int) -> str:
        """Account for one generated token; returns the text it releases and sets `finish_reason`."""
        self.generated += 1
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

    def sequence(self, params: SamplingParams, limit: int) -> SequenceState:
        """The state of a new row that may generate ``limit`` tokens."""
        stop_ids = self.stop_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        return SequenceState(self.tokenizer, params, stop_ids, limit)

    def delta(self, seq: SequenceState, sample_index: int, token: int, logprob: TokenLogprob | None) -> SequenceDelta:
        """Account for one sampled token of sample ``sample_index``; sets the finish reason when it ends the row."""
        text = seq.advance(token)
        return SequenceDelta(sample_index, 0, sample_index, token, text, logprob, seq.finish_reason)


def token_logprobs(tokens: list[int], chosen: list[float], top_ids: list[list[int]],
                   top_values: list[list[float]]) -> list[TokenLogprob]:
    """Host lists of a sampled batch (see `sambay.generate.sampling.Sampled`) → one `TokenLogprob` per row."""
    return [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
            for t, c, i, v in zip(tokens, chosen, top_ids, top_values, strict=True)]
