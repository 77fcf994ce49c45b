"""SambaY architecture configuration: one frozen dataclass, a typed layer plan, and named presets.

The SambaY decoder-hybrid-decoder (arXiv 2507.06607, Fig. 1) as released in Phi-4-mini-flash-reasoning::

    embed
      │   self-decoder (a Samba stack + one full-attention layer)
      ├── 0 MAMBA ─ 1 SLIDING_ATTENTION ─ 2 MAMBA ─ … ─ 15 SLIDING_ATTENTION
      ├── 16 MAMBA            its ungated SSM readout is the *memory* read by every GMU
      ├── 17 FULL_ATTENTION   its K/V is the *shared KV*: the only cache that grows with the context
      │   cross-decoder (no cache of its own)
      ├── 18 GMU ─ 19 CROSS_ATTENTION ─ 20 GMU ─ … ─ 31 CROSS_ATTENTION
    final norm → tied LM head

Every layer is a pre-norm residual block whose mixer is chosen by its `LayerKind`, followed by a SwiGLU MLP.
The plan is stored explicitly (a tuple of kinds), so the paper's variants are presets, not flags:
Samba+YOCO has no GMU, Samba has no cross-decoder, a dense Transformer++ is all FULL_ATTENTION with RoPE.
HF `config.json` names appear only in `sambay.checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class LayerKind(Enum):
    """The mixer of one residual block."""

    MAMBA = "mamba"  # Mamba-1 selective SSM (self-decoder)
    SLIDING_ATTENTION = "sliding_attention"  # attention over the last `window` positions (self-decoder)
    FULL_ATTENTION = "full_attention"  # causal attention over everything; the last one produces the shared KV
    GMU = "gmu"  # gated memory unit: gates the memory of the last self-decoder Mamba (cross-decoder)
    CROSS_ATTENTION = "cross_attention"  # queries only; keys/values are the shared KV (cross-decoder)


# Upper bounds on sizes, far above any published model (the release: 32 layers, d_model 2560, d_ff 10240,
# vocabulary 200064, 262144 positions), so that a corrupt or hostile config.json is refused with a message
# instead of building a plan of 10^9 layers or a 2^40-row embedding (issue 13). Lengths stop at 2^31 - 1,
# the int32 range of the paged cache's block tables; `sambay serve` checks its cache against the device.
MAX_LAYERS = 1024
MAX_SIZES = {"vocab_size": 2**24, "d_model": 2**16, "d_ff": 2**20, "window": 2**31 - 1, "d_state": 2**12,
             "d_conv": 2**8, "expand": 2**6, "max_seq_len": 2**31 - 1}

SELF_DECODER_KINDS = frozenset({LayerKind.MAMBA, LayerKind.SLIDING_ATTENTION, LayerKind.FULL_ATTENTION})
CROSS_DECODER_KINDS = frozenset({LayerKind.GMU, LayerKind.CROSS_ATTENTION})


def sambay_plan(n_layers: int, mamba_every: int = 2, *, gmu: bool = True) -> tuple[LayerKind, ...]:
    """The SambaY layer plan (the rule of the released remote code, spec §2.1).

    Layers below ``n_layers // 2 + 1`` form the self-decoder: every ``mamba_every``-th layer is MAMBA,
    the others SLIDING_ATTENTION, except that layer ``n_layers // 2 + 1`` is FULL_ATTENTION. Above it,
    the cross-decoder puts a GMU where the rule would put a Mamba (or CROSS_ATTENTION when ``gmu`` is
    False, which is Samba+YOCO) and CROSS_ATTENTION elsewhere.
    """
    if n_layers % 4 or n_layers < 4:
        raise ValueError(f"a SambaY plan needs n_layers to be a positive multiple of 4, got {n_layers}")
    if mamba_every < 1:
        raise ValueError(f"mamba_every must be >= 1, got {mamba_every}")
    half = n_layers // 2
    plan = []
    for i in range(n_layers):
        is_mamba_slot = i % mamba_every == 0
        if i <= half:
            plan.append(LayerKind.MAMBA if is_mamba_slot else LayerKind.SLIDING_ATTENTION)
        elif i == half + 1:
            plan.append(LayerKind.FULL_ATTENTION)
        else:
            plan.append(LayerKind.GMU if is_mamba_slot and gmu else LayerKind.CROSS_ATTENTION)
    if plan[half + 1] is not LayerKind.FULL_ATTENTION or LayerKind.MAMBA not in plan[: half + 1]:
        raise ValueError("mamba_every must leave a Mamba layer in the self-decoder")
    return tuple(plan)


@dataclass(frozen=True, kw_only=True)
class SambaYConfig:
    """Architecture of a SambaY-family model. Validated on construction; never mutated."""

    # sizes
    vocab_size: int  # embedding rows (the tokenizer may define fewer ids)
    d_model: int  # residual width
    n_heads: int  # query heads; a differential-attention layer pairs them (even, odd)
    n_kv_heads: int  # key/value heads (GQA)
    d_ff: int  # SwiGLU hidden width (fc1 emits 2 * d_ff: gate then up)
    plan: tuple[LayerKind, ...]  # one kind per layer, see `sambay_plan`
    # attention
    window: int  # SLIDING_ATTENTION sees the last `window` positions, itself included
    differential: bool = True  # differential attention (λ-weighted difference of two softmaxes)
    qkv_bias: bool = True  # bias on the fused QKV projection
    out_bias: bool = True  # bias on the attention output projection
    rope_theta: float | None = None  # None = NoPE (the release); a float enables RoPE on attention layers
    # Mamba-1
    d_state: int = 16  # SSM state size per channel
    d_conv: int = 4  # depthwise causal conv width
    expand: int = 2  # d_inner = expand * d_model
    conv_bias: bool = True
    # rest
    norm_eps: float = 1e-5  # LayerNorm epsilon (also the differential-attention sub-layer RMSNorm)
    tie_embeddings: bool = True  # LM head shares the embedding matrix
    max_seq_len: int = 262144  # upper bound for cache allocation (no position embeddings to size)
    # token ids carried for the checkpoint's config.json; the model itself never reads them
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "d_ff", "window", "d_state")
        for name in (*positive, "d_conv", "expand", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SambaYConfig.{name} must be a positive int, got {value!r}")
        for name, bound in MAX_SIZES.items():
            if getattr(self, name) > bound:
                raise ValueError(f"SambaYConfig.{name} must be <= {bound}, got {getattr(self, name)}")
        if self.d_conv < 2:
            raise ValueError(f"SambaYConfig.d_conv must be >= 2, got {self.d_conv}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.differential and (self.n_heads % 2 or self.n_kv_heads % 2):
            raise ValueError(
                "differential attention pairs heads (even, odd): n_heads and n_kv_heads must be even, "
                f"got {self.n_heads} and {self.n_kv_heads}"
            )
        if self.rope_theta is not None and (self.rope_theta <= 0 or self.head_dim % 2):
            raise ValueError("RoPE needs rope_theta > 0 and an even head_dim (d_model / n_heads), got "
                             f"rope_theta={self.rope_theta} and head_dim {self.head_dim}")
        if not (0.0 < self.norm_eps < 1.0):
            raise ValueError(f"norm_eps must be in (0, 1), got {self.norm_eps}")
        _validate_plan(self.plan)

    # derived sizes
    @property
    def n_layers(self) -> int:
        return len(self.plan)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        """Low-rank width of Δ; the release always uses ceil(d_model / 16) (spec §0.1)."""
        return math.ceil(self.d_model / 16)

    @property
    def n_self_layers(self) -> int:
        """Layers in the self-decoder; the rest form the cross-decoder."""
        return next((i for i, k in enumerate(self.plan) if k in CROSS_DECODER_KINDS), self.n_layers)

    @property
    def memory_layer(self) -> int | None:
        """Index of the Mamba layer whose ungated readout the GMUs read (the last self-decoder Mamba)."""
        if LayerKind.GMU not in self.plan:
            return None
        return max(i for i in range(self.n_self_layers) if self.plan[i] is LayerKind.MAMBA)

    @property
    def shared_kv_layer(self) -> int | None:
        """Index of the FULL_ATTENTION layer whose K/V the cross-attention layers read."""
        if LayerKind.CROSS_ATTENTION not in self.plan:
            return None
        return max(i for i in range(self.n_self_layers) if self.plan[i] is LayerKind.FULL_ATTENTION)

    def count(self, kind: LayerKind) -> int:
        """Number of layers of one kind."""
        return sum(k is kind for k in self.plan)


def _validate_plan(plan: tuple[LayerKind, ...]) -> None:
    if not isinstance(plan, tuple) or not plan or not all(isinstance(k, LayerKind) for k in plan):
        raise ValueError(f"plan must be a non-empty tuple of LayerKind, got {plan!r}")
    if len(plan) > MAX_LAYERS:
        raise ValueError(f"the plan has {len(plan)} layers, more than the bound of {MAX_LAYERS}")
    split = next((i for i, k in enumerate(plan) if k in CROSS_DECODER_KINDS), len(plan))
    late = [i for i in range(split, len(plan)) if plan[i] in SELF_DECODER_KINDS]
    if late:
        raise ValueError(
            f"layers {late} are self-decoder kinds placed after the cross-decoder starts at layer {split}"
        )
    if LayerKind.CROSS_ATTENTION in plan and LayerKind.FULL_ATTENTION not in plan[:split]:
        raise ValueError("CROSS_ATTENTION layers need a FULL_ATTENTION layer in the self-decoder")
    if LayerKind.GMU in plan and LayerKind.MAMBA not in plan[:split]:
        raise ValueError("GMU layers need a MAMBA layer in the self-decoder to read memory from")


# Phi-4-mini-flash-reasoning: numbers from the released config.json (tests/data/phi-4-mini-flash-reasoning)
# and spec §1.1 (Mamba defaults of the remote config class: d_state 16, d_conv 4, expand 2).
PHI4_MINI_FLASH = SambaYConfig(
    vocab_size=200064,
    d_model=2560,
    n_heads=40,
    n_kv_heads=20,
    d_ff=10240,
    plan=sambay_plan(32),
    window=512,
    max_seq_len=262144,
    bos_token_id=199999,
    eos_token_id=199999,
    pad_token_id=199999,
)

# The golden-parity fixture's shape (tests/data/phi4flash-tiny/checkpoint/config.json).
TINY = SambaYConfig(
    vocab_size=256,
    d_model=64,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    plan=sambay_plan(8),
    window=8,
    max_seq_len=4096,
)

PRESETS: dict[str, SambaYConfig] = {
    "phi4-mini-flash": PHI4_MINI_FLASH,
    "tiny": TINY,
}


# ---- the paper's architecture family as presets ------------------------------------------------------
#
# The SambaY paper (arXiv 2507.06607, §4 and Table 2) compares five architectures trained by the same
# recipe. Each is a plan plus two attention switches, so all of them run through the same model code:
#
#   preset suffix    plan                                   differential  rope
#   sambay-da        sambay_plan(n)                         yes           no (NoPE, the release)
#   sambay           sambay_plan(n)                         no            no
#   samba-yoco       sambay_plan(n, gmu=False)              no            no
#   samba            samba_plan(n): Mamba / SWA alternating no            no
#   transformer      transformer_plan(n): full attention    no            yes (Transformer++)


def samba_plan(n_layers: int, mamba_every: int = 2) -> tuple[LayerKind, ...]:
    """Samba (Ren et al. 2024): Mamba every ``mamba_every``-th layer, sliding-window attention elsewhere."""
    if n_layers < 1 or mamba_every < 1:
        raise ValueError(f"samba_plan needs n_layers >= 1 and mamba_every >= 1, got {n_layers}, {mamba_every}")
    return tuple(LayerKind.MAMBA if i % mamba_every == 0 else LayerKind.SLIDING_ATTENTION for i in range(n_layers))


def transformer_plan(n_layers: int) -> tuple[LayerKind, ...]:
    """A dense Transformer++: every layer is causal full attention (pair it with ``rope_theta``)."""
    if n_layers < 1:
        raise ValueError(f"transformer_plan needs n_layers >= 1, got {n_layers}")
    return (LayerKind.FULL_ATTENTION,) * n_layers


def variant(
    name: str, *, n_layers: int, d_model: int, n_heads: int, vocab_size: int, window: int, **sizes
) -> SambaYConfig:
    """One of the paper's five architectures (table above) at the given sizes.

    Args:
        name: "sambay-da", "sambay", "samba-yoco", "samba" or "transformer" (exact names).
        n_layers, d_model, n_heads, vocab_size, window: sizes; ``n_kv_heads`` defaults to n_heads // 2,
            ``d_ff`` to 4 * d_model, as in the release (GQA 2:1, d_ff = 4 d_model).
        **sizes: any other SambaYConfig field.
    """
    plans = {
        "sambay-da": (sambay_plan, True),
        "sambay": (sambay_plan, False),
        "samba-yoco": (lambda n: sambay_plan(n, gmu=False), False),
        "samba": (samba_plan, False),
        "transformer": (transformer_plan, False),
    }
    if name not in plans:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(plans)}")
    build_plan, differential = plans[name]
    fields = dict(
        vocab_size=vocab_size, d_model=d_model, n_heads=n_heads, n_kv_heads=max(n_heads // 2, 1),
        d_ff=4 * d_model, plan=build_plan(n_layers), window=window, differential=differential,
        rope_theta=10000.0 if name == "transformer" else None,
    )
    fields.update(sizes)
    return SambaYConfig(**fields)


ARCHITECTURES = ("sambay-da", "sambay", "samba-yoco", "samba", "transformer")

# Research sizes. Depth 8 and 16 bracket the smallest models of the paper's scaling study (§4). The ratios
# are the release's (head_dim 64, GQA 2:1, d_ff = 4 d_model, window 512, the o200k vocabulary of 200064
# rows); the widths are ours. Totals with the tied embedding (154M / 307M of it): 230M and 900M.
for _arch in ARCHITECTURES:
    PRESETS[f"{_arch}-230m"] = variant(
        _arch, n_layers=8, d_model=768, n_heads=12, vocab_size=200064, window=512, max_seq_len=65536
    )
    PRESETS[f"{_arch}-900m"] = variant(
        _arch, n_layers=16, d_model=1536, n_heads=24, vocab_size=200064, window=512, max_seq_len=65536
    )
    # Tiny: the shape of TINY above (the golden fixture) with room for a 512-id test tokenizer.
    PRESETS[f"{_arch}-tiny"] = variant(
        _arch, n_layers=4, d_model=64, n_heads=4, vocab_size=512, window=8, max_seq_len=4096
    )

# The arithmetic demo (scripts/make_arithmetic_data.py): the release layout (SambaY-DA, NoPE, GMU,
# differential attention) shrunk to 8 layers of width 192 for a 512-id tokenizer; GQA 3:1 and
# d_ff = 2.67 d_model keep it at 3.7M parameters: 7.5 MB in bf16. A window of 128 tokens spans the
# problem and the previous step of the worked solution.
PRESETS["sambay-da-arith"] = variant(
    "sambay-da", n_layers=8, d_model=192, n_heads=6, n_kv_heads=2, d_ff=512, vocab_size=512, window=128,
    max_seq_len=4096,
)
del _arch
