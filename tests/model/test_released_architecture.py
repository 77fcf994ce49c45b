"""The released architecture, built on the meta device from the real config.json: names, shapes, sizes."""

from __future__ import annotations

import json

import torch

from sambay import SambaY
from sambay.checkpoint import config_from_hf, name_pairs
from sambay.config import LayerKind
from tests.conftest import RELEASED_CONFIG_DIR

M, S, F, G, X = (LayerKind.MAMBA, LayerKind.SLIDING_ATTENTION, LayerKind.FULL_ATTENTION, LayerKind.GMU,
                 LayerKind.CROSS_ATTENTION)
RELEASED_PLAN = (
    M, S, M, S, M, S, M, S, M, S, M, S, M, S, M, S,  # 0-15: Samba self-decoder
    M, F,  # 16: memory-producing Mamba, 17: full attention (the shared KV)
    G, X, G, X, G, X, G, X, G, X, G, X, G, X,  # 18-31: cross-decoder
)


def _released():
    config = config_from_hf(json.loads((RELEASED_CONFIG_DIR / "config.json").read_text()))
    with torch.device("meta"):
        model = SambaY(config, backend="reference").to_dtype(torch.bfloat16)
    index = json.loads((RELEASED_CONFIG_DIR / "model.safetensors.index.json").read_text())
    return config, model, index


def test_plan_is_the_released_32_layer_layout():
    config, _, _ = _released()
    assert config.plan == RELEASED_PLAN
    assert config.memory_layer == 16 and config.shared_kv_layer == 17 and config.n_self_layers == 18
    assert (config.head_dim, config.d_inner, config.dt_rank, config.window) == (64, 5120, 160, 512)


def test_tensor_names_are_exactly_the_released_index():
    _, model, index = _released()
    names = set(name_pairs(model))
    assert len(names) == 434
    assert names == set(index["weight_map"])


def test_shapes_follow_the_spec():
    _, model, _ = _released()
    shapes = {hf: tuple(p.shape) for hf, p in zip(name_pairs(model), model.parameters(), strict=True)}
    expected = {
        "model.embed_tokens.weight": (200064, 2560),
        "model.final_layernorm.weight": (2560,),
        "model.layers.0.mlp.fc1.weight": (20480, 2560),
        "model.layers.0.mlp.fc2.weight": (2560, 10240),
        "model.layers.0.attn.in_proj.weight": (10240, 2560),
        "model.layers.0.attn.conv1d.weight": (5120, 1, 4),
        "model.layers.0.attn.conv1d.bias": (5120,),
        "model.layers.0.attn.x_proj.weight": (192, 5120),
        "model.layers.0.attn.dt_proj.weight": (5120, 160),
        "model.layers.0.attn.dt_proj.bias": (5120,),
        "model.layers.16.attn.A_log": (5120, 16),
        "model.layers.16.attn.D": (5120,),
        "model.layers.16.attn.out_proj.weight": (2560, 5120),
        "model.layers.18.attn.in_proj.weight": (5120, 2560),
        "model.layers.18.attn.out_proj.weight": (2560, 5120),
        "model.layers.1.attn.Wqkv.weight": (5120, 2560),
        "model.layers.17.attn.Wqkv.bias": (5120,),
        "model.layers.17.attn.out_proj.weight": (2560, 2560),
        "model.layers.17.attn.out_proj.bias": (2560,),
        "model.layers.1.attn.inner_cross_attn.lambda_q1": (64,),
        "model.layers.1.attn.inner_cross_attn.subln.weight": (128,),
        "model.layers.19.attn.Wqkv.weight": (2560, 2560),
        "model.layers.31.attn.Wqkv.bias": (2560,),
    }
    assert {k: shapes[k] for k in expected} == expected


def test_parameter_count_and_checkpoint_bytes():
    _, model, index = _released()
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 3_852_562_944
    assert sum(p.numel() * p.element_size() for p in params) == index["metadata"]["total_size"] == 7_706_608_640
    fp32 = {id(p) for p in model.fp32_parameters()}
    assert all((p.dtype == torch.float32) == (id(p) in fp32) for p in params)
    assert sum(p.numel() for p in model.fp32_parameters()) == 9 * 5120 * 16 + 16 * 4 * 64


def test_per_sequence_cache_is_9_mamba_8_windows_1_shared_kv():
    _, model, _ = _released()
    cache = model.new_cache(batch_size=1, max_length=4096, device="meta")
    assert (len(cache.mamba), len(cache.sliding), len(cache.full)) == (9, 8, 1)
    mamba = 9 * (5120 * 3 * 2 + 5120 * 16 * 4)  # conv inputs bf16 (d_conv - 1 columns) + fp32 SSM state
    sliding = 8 * 2 * 20 * 512 * 64 * 2
    shared = 2 * 20 * 4096 * 64 * 2  # 5,120 bytes per token: nothing for the 14 cross-decoder layers
    assert cache.nbytes == mamba + sliding + shared
