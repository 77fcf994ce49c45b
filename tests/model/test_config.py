"""SambaYConfig validation, the layer plan, presets, and the HF config.json round trip."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from sambay.checkpoint import IGNORED_HF_KEYS, config_from_hf, config_to_hf
from sambay.config import PRESETS, LayerKind, SambaYConfig, sambay_plan
from tests.conftest import RELEASED_CONFIG_DIR, TINY_FIXTURE, small_config

M, S, F, G, X = (LayerKind.MAMBA, LayerKind.SLIDING_ATTENTION, LayerKind.FULL_ATTENTION, LayerKind.GMU,
                 LayerKind.CROSS_ATTENTION)


def _released_json():
    return json.loads((RELEASED_CONFIG_DIR / "config.json").read_text())


def test_released_config_converts_to_the_preset():
    assert config_from_hf(_released_json()) == PRESETS["phi4-mini-flash"]


def test_hf_round_trip_keeps_every_released_key():
    raw = _released_json()
    back = config_to_hf(config_from_hf(raw))
    assert set(back) == set(raw)
    assert {k: v for k, v in back.items() if k not in IGNORED_HF_KEYS} == {
        k: v for k, v in raw.items() if k not in IGNORED_HF_KEYS}
    assert config_from_hf(back) == config_from_hf(raw)


def test_fixture_config_reads_mamba_keys():
    config = config_from_hf(json.loads((TINY_FIXTURE / "checkpoint" / "config.json").read_text()))
    assert config == replace(PRESETS["tiny"], bos_token_id=255, eos_token_id=255, pad_token_id=255)
    assert (config.dt_rank, config.d_inner, config.window) == (4, 128, 8)


@pytest.mark.parametrize("variant", [
    small_config(differential=False),
    small_config(plan=sambay_plan(8, gmu=False)),
    small_config(plan=(M, S, M, S)),
    small_config(plan=(F, F, F), differential=False, rope_theta=500000.0),
    small_config(d_state=8, d_conv=3, expand=3),
])
def test_variants_round_trip_through_hf_format(variant):
    assert config_from_hf(json.loads(json.dumps(config_to_hf(variant)))) == variant


def test_plan_rule_for_other_depths():
    assert sambay_plan(4) == (M, S, M, F)
    assert sambay_plan(8) == (M, S, M, S, M, F, G, X)
    assert sambay_plan(8, gmu=False) == (M, S, M, S, M, F, X, X)


@pytest.mark.parametrize("change,message", [
    ({"model_type": "phi3"}, "unsupported model_type"),
    ({"rope_bogus": 1}, "does not understand"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mb_per_layer": 3}, "mb_per_layer"),
    ({"sliding_window": [None, 512, None, 256]}, "exactly one window"),
    ({"num_hidden_layers": 30}, "multiple of 4"),
    ({"num_attention_heads": 48}, "divisible"),
    ({"layer_types": ["full_attention"] * 32}, "layer_types"),
])
def test_bad_hf_configs_are_rejected_with_clear_errors(change, message):
    raw = {**_released_json(), **change}
    with pytest.raises(ValueError, match=message):
        config_from_hf(raw)


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": 256, "num_attention_heads": 6}, "hidden_size (256) must be divisible by num_attention_heads (6)"),
    ({"num_key_value_heads": 3}, "num_attention_heads (40) must be a multiple of num_key_value_heads (3)"),
    ({"num_hidden_layers": 30}, "needs num_hidden_layers to be a positive multiple of 4"),
    ({"mamba_d_conv": 1}, "mamba_d_conv must be >= 2"),
    ({"layer_norm_eps": 2.0}, "layer_norm_eps must be in (0, 1)"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be a positive int"),
    ({"torch_dtype": "int8"}, "torch_dtype='int8' is not supported; supported: bfloat16, float16, float32"),
])
def test_hf_config_errors_name_the_config_json_keys(change, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        config_from_hf({**_released_json(), **change})
    assert not re.search(r"\b(d_model|n_heads|n_kv_heads|n_layers|d_conv|norm_eps|max_seq_len)\b", str(error.value))


def test_our_configs_keep_our_field_names():
    with pytest.raises(ValueError, match=re.escape("d_model (30) must be divisible by n_heads (4)")):
        small_config(d_model=30)


def test_missing_required_key_is_named():
    raw = _released_json()
    del raw["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        config_from_hf(raw)


def test_old_list_form_of_sliding_window_is_accepted():
    raw = {**_released_json(), "sliding_window": [512 if i < 16 and i % 2 else None for i in range(32)]}
    assert config_from_hf(raw).window == 512


@pytest.mark.parametrize("overrides,message", [
    ({"d_model": 30}, "divisible by n_heads"),
    ({"n_heads": 6, "n_kv_heads": 3, "d_model": 36}, "must be even"),
    ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"window": 0}, "window"),
    ({"plan": (M, G, S)}, "after the cross-decoder"),
    ({"plan": (M, S, X)}, "FULL_ATTENTION"),
    ({"plan": (S, F, G)}, "MAMBA"),
    ({"plan": ()}, "non-empty"),
    ({"plan": ["mamba"]}, "tuple of LayerKind"),
    ({"d_conv": 1}, "d_conv"),
    ({"vocab_size": 1.5}, "vocab_size"),
])
def test_config_validation_messages(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        small_config().d_model = 64  # type: ignore[misc]
    assert isinstance(PRESETS["tiny"], SambaYConfig)
