"""Sampling: parameter validation, exact masks on hand-made logits, the exponential race's distribution,
per-row seeding, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from sambay.generate.sampling import (
    REASONING_DEFAULTS,
    PenaltyState,
    SamplingParams,
    apply_penalties,
    exponential_race,
    make_generator,
    mask_min_p,
    mask_top_k,
    mask_top_p,
    process_logits,
    sample,
)

PROBS = [0.05, 0.5, 0.1, 0.2, 0.15]  # deliberately not sorted


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, vocab)


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", -0.1, "temperature"),
    ("temperature", math.inf, "temperature must be a finite"),
    ("temperature", math.nan, "temperature must be a finite"),
    ("top_k", -1, "top_k"),
    ("top_k", 2.5, "top_k"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("min_p", 1.1, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("repetition_penalty", 1e-300, r"repetition_penalty must be in \[0.01, 10.0\]"),
    ("repetition_penalty", 10.5, "repetition_penalty"),
    ("repetition_penalty", math.nan, "repetition_penalty"),
    ("presence_penalty", math.nan, "presence_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", -3.0, "frequency_penalty"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("stop", "###", "not one string"),
    ("stop", ("",), "non-empty"),
    ("stop_token_ids", (-1,), "stop_token_ids"),
    ("n", 0, "n must be"),
    ("logprobs", 21, "logprobs"),
    ("seed", "7", "seed"),
])
def test_invalid_params_raise_clear_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_reasoning_defaults_follow_the_model_card():
    assert (REASONING_DEFAULTS.temperature, REASONING_DEFAULTS.top_p) == (0.6, 0.95)
    assert REASONING_DEFAULTS.replace(temperature=0).is_greedy


def test_top_k_keeps_the_k_largest():
    assert kept(mask_top_k(logits_of(PROBS), 2)) == [1, 3]
    assert kept(mask_top_k(logits_of(PROBS), 0)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("p", "expected"), [(0.45, [1]), (0.69, [1, 3]), (0.75, [1, 3, 4]), (0.86, [1, 2, 3, 4]),
                                             (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(mask_top_p(logits_of(PROBS), p)) == expected


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert kept(mask_min_p(logits_of(PROBS), 0.25)) == [1, 3, 4]  # threshold 0.125
    assert kept(mask_min_p(logits_of(PROBS), 0.0)) == [0, 1, 2, 3, 4]


def test_masks_compose_in_order():
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.35)
    # top-k drops 0.05; top-p of the rest keeps 0.5, 0.2, 0.15 (mass before 0.1 is 0.85); min-p drops 0.15
    assert kept(process_logits(logits_of(PROBS), params)) == [1, 3]


def test_greedy_is_argmax_without_masks():
    params = SamplingParams(temperature=0, top_k=1, top_p=0.1)
    assert sample(logits_of(PROBS), params).tokens.tolist() == [1]  # no generator needed
    assert torch.isfinite(process_logits(logits_of(PROBS), params)).all()


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 9.9e-6])
def test_a_temperature_below_the_epsilon_is_greedy_with_finite_logprobs(temperature):
    """Dividing fp32 logits by 1e-45 overflows to inf and softmax of inf is NaN: such rows are greedy."""
    params = SamplingParams(temperature=temperature, repetition_penalty=0.01, logprobs=3)
    state = penalty_state(prompt=[3], generated=[], vocab=len(PROBS))
    out = sample(logits_of(PROBS) * 1e4, params, penalties=state)  # no generator: greedy needs none
    assert params.is_greedy and out.tokens.tolist() == [3]  # a penalty < 1 favours seen tokens
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.top_logprobs).all()
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_exponential_race_matches_the_distribution():
    draws = 20_000
    probs = torch.tensor(PROBS).expand(draws, -1)
    tokens = exponential_race(probs, [make_generator(seed, "cpu") for seed in range(draws)])
    freq = torch.bincount(tokens, minlength=len(PROBS)).double() / draws
    sigma = math.sqrt(0.25 / draws)
    assert (freq - torch.tensor(PROBS, dtype=torch.double)).abs().max() < 5 * sigma, freq.tolist()


def test_sample_draws_from_the_processed_distribution():
    draws = 20_000
    logits = logits_of(PROBS).expand(draws, -1)
    params = SamplingParams(temperature=0.5, top_k=3)
    tokens = sample(logits, params, [make_generator(seed, "cpu") for seed in range(draws)]).tokens
    expected = torch.zeros(len(PROBS), dtype=torch.double)
    expected[[1, 3, 4]] = torch.tensor([0.5, 0.2, 0.15], dtype=torch.double) ** 2  # p^(1/T), T = 0.5
    expected /= expected.sum()
    freq = torch.bincount(tokens, minlength=len(PROBS)).double() / draws
    assert (freq - expected).abs().max() < 5 * math.sqrt(0.25 / draws), freq.tolist()


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0)
    torch.manual_seed(1)
    mine = torch.randn(1, 50)
    others = torch.randn(3, 50)

    def draw(logits: torch.Tensor, seeds: list[int], row: int) -> list[int]:
        generators = [make_generator(s, "cpu") for s in seeds]
        return [int(sample(logits, params, generators).tokens[row]) for _ in range(20)]

    alone = draw(mine, [7], 0)
    assert draw(mine, [7], 0) == alone
    assert draw(torch.cat([others[:2], mine, others[2:]]), [1, 2, 7, 3], 2) == alone
    assert draw(mine, [8], 0) != alone


def test_unseeded_generators_follow_torch_global_seed():
    torch.manual_seed(5)
    a = [make_generator(None, "cpu").initial_seed() for _ in range(3)]
    torch.manual_seed(5)
    assert [make_generator(None, "cpu").initial_seed() for _ in range(3)] == a
    assert len(set(a)) == 3


def penalty_state(prompt: list[int], generated: list[int], vocab: int = 4) -> PenaltyState:
    state = PenaltyState.from_prompts(torch.tensor([[*prompt, 0, 0]]), torch.tensor([len(prompt)]), vocab)
    for token in generated:
        state.update(torch.tensor([token]))
    return state


def test_prompt_padding_does_not_count_as_seen():
    state = penalty_state([2, 3], [])
    assert state.prompt_mask.tolist() == [[False, False, True, True]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits, params, penalty_state(prompt=[0], generated=[1]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, penalty_state(prompt=[0, 3], generated=[1, 1, 2]))
    assert out.tolist() == [[0.0, -1.0, -0.75, 0.0]]


def test_penalties_need_a_state():
    with pytest.raises(ValueError, match="PenaltyState"):
        process_logits(torch.zeros(1, 4), SamplingParams(presence_penalty=1.0))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.8, logprobs=5),
                                    SamplingParams(temperature=0, logprobs=5)])
def test_logprobs_are_the_full_processed_distribution(params):
    torch.manual_seed(2)
    logits = torch.randn(3, 5)
    out = sample(logits, params, [make_generator(s, "cpu") for s in range(3)])
    assert torch.allclose(out.top_logprobs.exp().sum(-1), torch.ones(3), atol=1e-6)  # top-5 of 5 = everything
    chosen = out.top_logprobs.gather(1, (out.top_ids == out.tokens.view(-1, 1)).float().argmax(1, keepdim=True))
    assert torch.allclose(out.logprobs, chosen.squeeze(1))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    expected = process_logits(logits, params).log_softmax(-1)
    assert torch.allclose(out.top_logprobs, expected.sort(-1, descending=True).values)


def test_masked_tokens_get_minus_infinity_logprob():
    params = SamplingParams(temperature=1.0, top_k=2, logprobs=5)
    out = sample(logits_of(PROBS), params, [make_generator(0, "cpu")])
    assert out.top_ids[0, :2].tolist() == [1, 3]
    assert torch.isinf(out.top_logprobs[0, 2:]).all()


def test_sampling_needs_generators():
    with pytest.raises(ValueError, match="Generator"):
        sample(logits_of(PROBS), SamplingParams(temperature=1.0))
    with pytest.raises(ValueError, match="one generator per row"):
        exponential_race(torch.ones(2, 3) / 3, [make_generator(0, "cpu")])
