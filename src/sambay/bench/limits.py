"""Byte and FLOP models: what a decode step must move and what a prefill must compute (spec §6).

Decode (memory-bound): every weight is read once per step (the tied LM head in full, one embedding
row), every Mamba state is read and written, every sliding window and the shared KV are read by the
layers that attend to them, and each attention layer writes one new K/V per row. Prefill
(compute-bound): useful FLOPs are those of the projections the YOCO prefill runs (the self-decoder on
every token; the cross-decoder and the LM head on the last token only) plus attention over visible keys.
"""

from __future__ import annotations

from sambay.config import LayerKind, SambaYConfig


def _kv_bytes_per_token(config: SambaYConfig, dtype_bytes: int = 2) -> int:
    return 2 * config.n_kv_heads * config.head_dim * dtype_bytes  # K and V of one layer


def decode_bytes(config: SambaYConfig, weight_bytes: int, batch: int, context: int) -> int:
    """Bytes a decode step of ``batch`` rows at ``context`` tokens of context must move at least."""
    kv = _kv_bytes_per_token(config)
    n_mamba = config.count(LayerKind.MAMBA)
    mamba_state = config.d_inner * ((config.d_conv - 1) * 2 + config.d_state * 4)  # bf16 conv, fp32 SSM
    readers_full = config.count(LayerKind.FULL_ATTENTION) + config.count(LayerKind.CROSS_ATTENTION)
    sliding = config.count(LayerKind.SLIDING_ATTENTION) * min(context, config.window) * kv
    writers = config.count(LayerKind.FULL_ATTENTION) + config.count(LayerKind.SLIDING_ATTENTION)
    per_row = 2 * n_mamba * mamba_state + sliding + readers_full * context * kv + writers * kv
    return weight_bytes + batch * per_row


def _attention_flops_per_key(config: SambaYConfig) -> int:
    """FLOPs per (query, visible key) of one attention layer, over all query heads.

    Plain: QKᵀ (2·hd) and PV (2·hd) per head. Differential: QKᵀ per head, but each head's softmax
    multiplies values of both halves, 2·hd wide (4·hd).
    """
    pv = 4 if config.differential else 2
    return (2 + pv) * config.n_heads * config.head_dim


def prefill_flops(config: SambaYConfig, params_by_layer: list[int], lm_head_params: int, tokens: int) -> float:
    """Useful FLOPs of a YOCO prefill of ``tokens`` tokens (batch 1)."""
    n_self = config.n_self_layers
    matmul = 2 * tokens * sum(params_by_layer[:n_self]) + 2 * sum(params_by_layer[n_self:]) + 2 * lm_head_params
    per_key = _attention_flops_per_key(config)
    attn = 0.0
    for kind in config.plan[:n_self]:
        if kind is LayerKind.FULL_ATTENTION:
            attn += per_key * tokens * (tokens + 1) / 2
        elif kind is LayerKind.SLIDING_ATTENTION:
            w = min(config.window, tokens)
            attn += per_key * (tokens * w - w * (w - 1) / 2)
    attn += per_key * tokens * config.count(LayerKind.CROSS_ATTENTION)  # the last token over all keys
    return matmul + attn
