"""Sampling: request parameters, logits processors, and sync-free sampling with per-row generators.

`sample(logits, params, generators, penalties)` turns next-token logits into token ids without a host
synchronisation, so a decode loop can keep the device busy (gpt-fast's `multinomial_sample_one_no_sync`).

Processing order (HF's logits-warper order), applied to fp32 logits of shape (b, vocab):
    1. penalties: repetition over prompt + generated tokens (HF / vLLM: a positive logit is divided by
       the penalty, a negative one multiplied); presence and frequency over generated tokens only
       (OpenAI: ``logit -= presence * [count > 0] + frequency * count``);
    2. temperature (greedy below `GREEDY_TEMPERATURE`: argmax of the penalised logits, no masks, no noise);
    3. top-k, then top-p (smallest set of most likely tokens whose mass reaches p), then min-p
       (drop tokens below ``min_p`` × the most likely token's probability).

Sampling is the exponential race: ``argmax(p / q)`` with ``q ~ Exponential(1)`` i.i.d. picks token i with
probability exactly ``p_i`` (the Gumbel-max trick in disguise) and needs no cumulative sums or sync.
Each row draws its noise from its own `torch.Generator`, so a seeded request produces the same tokens
whatever else shares its batch.

Numeric domain (`SamplingParams` refuses anything outside it, so no step produces inf or NaN): every float
is finite; a temperature below 1e-5 is greedy (dividing fp32 logits by 1e-45 overflows to inf, and
softmax of inf is NaN); the repetition penalty lies in [0.01, 10] (1e-300 is 0 in fp32, and dividing by
it overflows; 1/0.01 scales a logit by at most 100); presence and frequency penalties lie in [-2, 2]
(OpenAI's range). The HTTP API (`sambay.serve.schemas`) uses the same bounds, with OpenAI's temperature
cap of 2 on top.

Token masks (a reasoning budget's forced close, a grammar's allowed tokens: `sambay.generate.constraints`)
are applied by the engine core before all of this, as -inf logits (`apply_token_bitmask`), so every
processor and the sampler see only the allowed tokens.

Logprobs are ``log_softmax`` of the *processed* distribution, the one the token was drawn from (after
penalties, temperature and masks: masked tokens get -inf). For greedy rows they are ``log_softmax`` of
the penalised logits at temperature 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sambay.generate.guided import GuidedDecoding

GREEDY_TEMPERATURE = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS)
REPETITION_PENALTY_RANGE = (0.01, 10.0)  # inclusive; 1 = off
PRESENCE_PENALTY_RANGE = (-2.0, 2.0)  # inclusive, OpenAI's range; also the frequency penalty's


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    _check(low <= value <= high, f"{name} must be in [{low}, {high}], got {value!r}")  # NaN fails too


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request. Neutral values switch a processor off."""

    temperature: float = 1.0  # finite, >= 0; below GREEDY_TEMPERATURE (0 included) = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # in REPETITION_PENALTY_RANGE, [0.01, 10]; 1 = off
    presence_penalty: float = 0.0  # in [-2, 2], OpenAI's range
    frequency_penalty: float = 0.0  # in [-2, 2]
    seed: int | None = None  # None: drawn from torch's global RNG
    max_new_tokens: int = 256
    stop: Sequence[str] = ()  # stop strings; the output ends before the first one
    stop_token_ids: Sequence[int] | None = None  # None: the model directory's generation_config eos ids
    n: int = 1  # samples per prompt, sharing one prefill
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the k most likely
    skip_special_tokens: bool = True  # drop special markers from the text
    reasoning: bool = False  # the reply opens a <think> block (a reasoning model's chat prompt); see constraints
    max_reasoning_tokens: int | None = None  # tokens inside <think> before its close is forced; 0: no reasoning
    guided: GuidedDecoding | None = None  # the grammar the answer follows (JSON schema, regex, choice)

    def __post_init__(self):
        _check(0 <= self.temperature < math.inf,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an int >= 0, got {self.top_k!r}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        _check_range("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY_RANGE)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), PRESENCE_PENALTY_RANGE)
        _check(self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}")
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        _check(not isinstance(self.stop, str), "stop must be a sequence of strings, not one string")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}")
        if self.stop_token_ids is not None:
            _check(all(isinstance(i, int) and i >= 0 for i in self.stop_token_ids),
                   f"stop_token_ids must be ints >= 0, got {self.stop_token_ids!r}")
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               f"logprobs must be None or an int in [0, 20], got {self.logprobs!r}")
        budget = self.max_reasoning_tokens
        _check(budget is None or (isinstance(budget, int) and budget >= 0),
               f"max_reasoning_tokens must be None or an int >= 0, got {budget!r}")
        _check(budget is None or self.reasoning, "max_reasoning_tokens bounds the <think> block of a reasoning "
               "request: set reasoning=True (a chat prompt of a reasoning model)")
        _check(self.guided is None or isinstance(self.guided, GuidedDecoding),
               f"guided must be a GuidedDecoding or None, got {type(self.guided).__name__}")

    @property
    def is_greedy(self) -> bool:
        """Argmax, no noise: a temperature this small would overflow the scaled logits (module docstring)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# The model card's recommended settings for Phi-4-mini-flash-reasoning (temperature 0.6, top_p 0.95,
# max_new_tokens 32768 in its example).
REASONING_DEFAULTS = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=32768)


@dataclass
class PenaltyState:
    """Per-row token statistics the penalties need, updated on the device without a sync."""

    prompt_mask: Tensor  # (b, vocab) bool: token occurs in the row's prompt
    output_counts: Tensor  # (b, vocab) int32: times the row has generated each token

    @staticmethod
    def from_prompts(tokens: Tensor, lengths: Tensor, vocab_size: int) -> PenaltyState:
        """Statistics of right-padded prompts.

        Args:
            tokens: (b, t) int64 prompt ids, right-padded.
            lengths: (b,) valid tokens per row.
            vocab_size: logits width.
        """
        b, t = tokens.shape
        valid = torch.arange(t, device=tokens.device).view(1, -1) < lengths.view(-1, 1)  # (b, t)
        seen = torch.zeros(b, vocab_size, dtype=torch.int32, device=tokens.device)
        seen.scatter_add_(1, tokens, valid.to(torch.int32))  # padding adds 0, so its ids are not marked
        counts = torch.zeros(b, vocab_size, dtype=torch.int32, device=tokens.device)
        return PenaltyState(prompt_mask=seen > 0, output_counts=counts)

    def update(self, tokens: Tensor) -> None:
        """Count one generated token per row; tokens: (b,) int64."""
        ones = torch.ones_like(tokens, dtype=torch.int32).view(-1, 1)
        self.output_counts.scatter_add_(1, tokens.view(-1, 1), ones)

    def repeat(self, n: int) -> PenaltyState:
        """The state for n samples per row, sample-major (row j * b + i is sample j of row i)."""
        return PenaltyState(self.prompt_mask.repeat(n, 1), self.output_counts.repeat(n, 1))


def apply_penalties(logits: Tensor, params: SamplingParams, state: PenaltyState) -> Tensor:
    """Repetition, presence and frequency penalties (module docstring). logits: (b, vocab) fp32."""
    counts = state.output_counts
    if params.repetition_penalty != 1:
        seen = state.prompt_mask | (counts > 0)
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.presence_penalty or params.frequency_penalty:
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    return logits


def mask_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept); the rest get -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def mask_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the most likely tokens until their mass reaches p (always at least one); the rest get -inf."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # (b, vocab) mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p, so it is always kept
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def mask_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below ``min_p`` × the row's largest probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (b, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, penalties: PenaltyState | None = None) -> Tensor:
    """The distribution `sample` draws from, as fp32 logits (module docstring gives the order).

    Args:
        logits: (b, vocab) next-token logits, any float dtype.
        params: the request's parameters.
        penalties: token statistics; required when ``params.has_penalties``.

    Returns:
        (b, vocab) fp32 logits; for greedy params only penalised (temperature 1, no masks).
    """
    logits = logits.float()
    if params.has_penalties:
        if penalties is None:
            raise ValueError("these sampling params use penalties: pass a PenaltyState")
        logits = apply_penalties(logits, params, penalties)
    if params.is_greedy:
        return logits
    logits = logits / params.temperature
    logits = mask_top_k(logits, params.top_k)
    logits = mask_top_p(logits, params.top_p)
    return mask_min_p(logits, params.min_p)


def exponential_race(probs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Draw one token per row with probability ``probs[row]``, without a host sync.

    Args:
        probs: (b, vocab) fp32 probabilities (rows sum to 1; zeros are never drawn).
        generators: one per row, on ``probs.device``; row r's noise comes only from ``generators[r]``.

    Returns:
        (b,) int64 token ids.
    """
    if len(generators) != probs.shape[0]:
        raise ValueError(f"need one generator per row: {probs.shape[0]} rows, {len(generators)} generators")
    noise = torch.empty_like(probs)  # (b, vocab)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


@dataclass
class Sampled:
    """The result of `sample`; every tensor stays on the device."""

    tokens: Tensor  # (b,) int64
    logprobs: Tensor | None = None  # (b,) fp32 log-probability of the chosen token
    top_ids: Tensor | None = None  # (b, k) int64 the k most likely tokens
    top_logprobs: Tensor | None = None  # (b, k) fp32 their log-probabilities


def sample(
    logits: Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator] | None = None,
    penalties: PenaltyState | None = None,
) -> Sampled:
    """One token per row: greedy or the exponential race over the processed distribution.

    Args:
        logits: (b, vocab) next-token logits.
        params: the request's parameters (all rows share them).
        generators: one per row (unused when greedy).
        penalties: token statistics (required with penalties); not updated here.

    Returns:
        The tokens and, when ``params.logprobs`` is not None, their logprobs and the top-k.
    """
    processed = process_logits(logits, params, penalties)  # (b, vocab) fp32
    if params.is_greedy:
        tokens = processed.argmax(dim=-1)
    else:
        if generators is None:
            raise ValueError("sampling with temperature > 0 needs one torch.Generator per row")
        tokens = exponential_race(processed.softmax(-1), generators)
    if params.logprobs is None:
        return Sampled(tokens)
    logprobs = processed.log_softmax(-1)  # (b, vocab)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).squeeze(1)
    top = logprobs.topk(params.logprobs, dim=-1)
    return Sampled(tokens, chosen, top.indices, top.values)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """Logits with every token not allowed by ``bitmask`` set to -inf.

    Args:
        logits: (b, vocab) next-token logits.
        bitmask: (b, words) int32 on the logits' device: bit ``i % 32`` of word ``i // 32`` allows token i
            (llguidance's and xgrammar's layout); tokens past ``32 * words`` are not allowed.

    Returns:
        (b, vocab) masked logits (a new tensor).
    """
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # (b, 32 * words)
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return logits.masked_fill(~allowed[:, :vocab], float("-inf"))


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator for one row, seeded with ``seed`` or, when None, from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    return torch.Generator(device=device).manual_seed(seed)
