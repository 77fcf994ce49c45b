"""The load generator's pure parts: the decode bandwidth limit, Poisson arrivals, token-id prompts, and
the checks of `LoadConfig`."""

from __future__ import annotations

import itertools

import pytest

from sambay.bench.limits import decode_bytes
from sambay.default_model import default_model_dir
from sambay.serve.loadgen import PROMPT_TOKEN_IDS, LoadConfig, ModelFootprint, arrival_offsets, decode_limit, prompt_ids
from sambay.tokenizer import load_tokenizer


def test_model_footprint_reads_config_and_weight_bytes():
    footprint = ModelFootprint.read(default_model_dir())
    assert footprint.config.vocab_size == 512 and footprint.config.d_model == 192
    assert footprint.weight_bytes == 7512832  # the index's total_size


def test_decode_limit_at_the_mean_context():
    footprint = ModelFootprint.read(default_model_dir())
    limit = decode_limit(footprint, 4.3e12, batch=8, prompt_tokens=2048, output_tokens=32768,
                         output_tokens_per_s=1000.0)
    context = 2048 + 32768 // 2
    expected = 8 * 4.3e12 / decode_bytes(footprint.config, footprint.weight_bytes, 8, context)
    assert limit["mean_context"] == context and limit["batch"] == 8
    assert limit["limit_output_tokens_per_s"] == pytest.approx(expected, abs=0.1)
    assert limit["fraction_of_limit"] == pytest.approx(1000.0 / expected, rel=1e-3)
    wider = decode_limit(footprint, 4.3e12, batch=16, prompt_tokens=2048, output_tokens=32768, output_tokens_per_s=1)
    longer = decode_limit(footprint, 4.3e12, batch=8, prompt_tokens=8192, output_tokens=32768, output_tokens_per_s=1)
    assert wider["limit_output_tokens_per_s"] > expected > longer["limit_output_tokens_per_s"]


def test_poisson_arrivals_are_seeded():
    offsets = arrival_offsets(4000, 20.0, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0 and min(gaps) >= 0 and offsets == arrival_offsets(4000, 20.0, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential gaps of mean 1 / rate
    assert offsets != arrival_offsets(4000, 20.0, seed=2)
    assert arrival_offsets(3, None, seed=1) == [0.0, 0.0, 0.0]  # closed loop: the concurrency paces


def test_token_prompts_are_letters_in_any_byte_level_vocab(engine):
    ids = prompt_ids(300, index=5, seed=0)
    assert len(ids) == 300 and set(ids) <= set(PROMPT_TOKEN_IDS)
    assert ids == prompt_ids(300, index=5, seed=0) and ids != prompt_ids(300, index=6, seed=0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for tokenizer in (load_tokenizer(default_model_dir()), engine.tokenizer):  # 384 ids; the release's 200k
        assert tokenizer.decode(list(PROMPT_TOKEN_IDS)) == letters


@pytest.mark.parametrize(("settings", "message"), [
    ({"concurrency": None}, "needs a concurrency"),
    ({"request_rate": 0.0}, "rate must be > 0"),
    ({"prompt_lengths": (4, 0)}, "prompt length"),
    ({"concurrency": 2, "workers": 3}, "workers must be in"),
    ({"concurrency": None, "request_rate": 1.0, "requests": 4, "workers": 5}, "workers must be in"),
])
def test_load_config_checks(settings, message):
    with pytest.raises(ValueError, match=message):
        LoadConfig(**settings)
