"""SambaY: the decoder-hybrid-decoder of Phi-4-mini-flash-reasoning (arXiv 2507.06607), in PyTorch.

    tokens → embed → SelfDecoder ─┬─ x ────────────────→ CrossDecoder → norm → LM head → logits
                                  ├─ memory  (b, t, d_inner)   ungated readout of the last Mamba
                                  └─ shared  SharedKV          K/V of the full-attention layer

The self-decoder (a Samba stack of Mamba and sliding-window attention, then one full-attention layer)
runs over every new token and owns every cache. The cross-decoder (GMU and cross-attention layers)
caches nothing: it reads the memory and the shared KV. When only the next-token distribution is
needed it runs on the last token of each row only (YOCO's linear-time prefill, SambaY §3).

Notable features:
- one pure-PyTorch op table (`sambay.ops`), chosen once at construction; it is also the CPU path;
- typed caches (`sambay.cache`) passed in by the caller; the model writes the new tokens' state but never
  advances `seqlens`: the engine does, once per forward (`SambaYCache.advance`);
- ragged batches: ``lengths`` marks right padding; padded tokens never reach any cache;
- dtype policy: parameters in the model dtype except ``A_log`` and the λ vectors (fp32, as stored),
  fp32 residual stream, norms and projections in the model dtype, conv/scan/attention math in fp32,
  logits in the model dtype.

Glossary (the same words name config fields, attributes and op arguments):
    b batch · t new tokens · s keys · d_model residual width · n_heads / n_kv_heads query / key-value
    heads · head_dim · d_inner Mamba channels · d_state SSM state size · d_conv conv width · dt_rank Δ
    rank · window sliding-window size · vocab_size embedding rows · plan per-layer LayerKind tuple
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sambay.cache import SambaYCache, allocate_cache
from sambay.config import LayerKind, SambaYConfig
from sambay.model.attention import DifferentialCore, FullAttention, SharedKV, SlidingWindowAttention
from sambay.model.blocks import Block, build_mixer
from sambay.model.init import init_weights
from sambay.model.loss import head_nll
from sambay.model.mamba import Mamba
from sambay.model.span import Span
from sambay.ops import Ops, resolve_backend

log = logging.getLogger("sambay.model")


def _cache_slice(cache: SambaYCache | None, kind: LayerKind, index: int):
    """The state of the ``index``-th layer of ``kind`` (None without a cache)."""
    if cache is None:
        return None
    match kind:
        case LayerKind.MAMBA:
            return cache.mamba[index]
        case LayerKind.SLIDING_ATTENTION:
            return cache.sliding[index]
        case LayerKind.FULL_ATTENTION:
            return cache.full[index]
    raise AssertionError(f"{kind} keeps no cache")


class SelfDecoder(nn.Module):
    """Mamba / sliding-window / full-attention layers; produces the memory and the shared KV."""

    def __init__(self, config: SambaYConfig, ops: Ops):
        super().__init__()
        n = config.n_self_layers
        self.layers = nn.ModuleList(Block(build_mixer(config, i, ops), config, ops) for i in range(n))
        self.kinds = config.plan[:n]
        self.slots = tuple(sum(k is kind for k in self.kinds[:i]) for i, kind in enumerate(self.kinds))
        self.memory_layer, self.shared_kv_layer = config.memory_layer, config.shared_kv_layer

    def forward(
        self, x: Tensor, span: Span, cache: SambaYCache | None
    ) -> tuple[Tensor, Tensor | None, SharedKV | None]:
        """x: (b, t, d_model) fp32 → (x, memory (b, t, d_inner) or None, SharedKV or None)."""
        memory = shared = None
        for i, block in enumerate(self.layers):
            x, aux = block(x, span, _cache_slice(cache, self.kinds[i], self.slots[i]))
            if i == self.memory_layer:
                memory = aux
            if i == self.shared_kv_layer:
                shared = aux
        return x, memory, shared


class CrossDecoder(nn.Module):
    """GMU and cross-attention layers; no cache of their own."""

    def __init__(self, config: SambaYConfig, ops: Ops):
        super().__init__()
        first = config.n_self_layers
        self.layers = nn.ModuleList(
            Block(build_mixer(config, i, ops), config, ops) for i in range(first, config.n_layers)
        )

    def forward(self, x: Tensor, span: Span, memory: Tensor | None, shared: SharedKV | None) -> Tensor:
        """x: (b, t, d_model) fp32; memory: (b, t, d_inner) for the same tokens. Returns x."""
        for block in self.layers:
            x, _ = block(x, span, memory, shared)
        return x


class SambaY(nn.Module):
    """The SambaY language model. ``forward(tokens, cache=None)`` → logits."""

    def __init__(self, config: SambaYConfig, *, backend: str = "auto"):
        super().__init__()
        ops = resolve_backend(backend)
        self.config, self.ops = config, ops
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.self_decoder = SelfDecoder(config, ops)
        self.cross_decoder = CrossDecoder(config, ops)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    # construction helpers --------------------------------------------------------------------------

    def init_weights(self, generator: torch.Generator | None = None) -> SambaY:
        """Random initialisation (see `sambay.model.init`); returns self."""
        init_weights(self, self.config.n_layers, generator)
        return self

    def fp32_parameters(self) -> list[nn.Parameter]:
        """Parameters kept in fp32 whatever the model dtype (A_log, λ vectors)."""
        return [p for m in self.modules() if isinstance(m, Mamba | DifferentialCore) for p in m.fp32_parameters()]

    def to_dtype(self, dtype: torch.dtype) -> SambaY:
        """Cast floating parameters to ``dtype``, keeping `fp32_parameters` in fp32; returns self."""
        keep = {id(p) for p in self.fp32_parameters()}
        for p in self.parameters():
            if id(p) not in keep and p.is_floating_point():
                p.data = p.data.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(
        self,
        *,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        block_size: int | None = None,
        kv_blocks: int | None = None,
    ) -> SambaYCache:
        """Allocate an empty cache for ``batch_size`` rows of at most ``max_length`` tokens each.

        ``block_size`` pages the full-attention K/V into a pool of ``kv_blocks`` blocks (`sambay.cache`).
        Mamba channels and kv heads are read from the modules, not the config, so a model sharded by
        `sambay.parallel.tensor_parallel` gets the cache of its rank."""
        c = self.config
        if not isinstance(max_length, int) or max_length > c.max_seq_len:
            raise ValueError(f"max_length must be an int <= max_seq_len ({c.max_seq_len}), got {max_length!r}")
        mamba = next((m for m in self.modules() if isinstance(m, Mamba)), None)
        attention = next((m for m in self.modules() if isinstance(m, SlidingWindowAttention | FullAttention)), None)
        return allocate_cache(
            n_mamba=c.count(LayerKind.MAMBA),
            n_sliding=c.count(LayerKind.SLIDING_ATTENTION),
            n_full=c.count(LayerKind.FULL_ATTENTION),
            batch_size=batch_size,
            max_length=max_length,
            d_inner=c.d_inner if mamba is None else mamba.D.shape[0],
            d_state=c.d_state,
            d_conv=c.d_conv,
            n_kv_heads=c.n_kv_heads if attention is None else attention.n_kv_heads,
            head_dim=c.head_dim,
            window=c.window,
            dtype=dtype or self.dtype,
            device=device or self.device,
            block_size=block_size,
            kv_blocks=kv_blocks,
        )

    # forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        cache: SambaYCache | None = None,
        *,
        lengths: Tensor | None = None,
        last_only: bool | None = None,
        check_inputs: bool = True,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Logits for new tokens, continuing the sequences held in ``cache``.

        Args:
            tokens: (b, t) int token ids; with ``lengths``, row r's tokens are ``tokens[r, :lengths[r]]``
                and the rest is right padding.
            cache: state from earlier calls (None: a fresh forward, nothing is kept). The new tokens'
                state is written into it; its lengths are the caller's to advance (`SambaYCache.advance`).
            lengths: (b,) valid tokens per row (None: all t).
            last_only: return only each row's last valid position, (b, 1, vocab_size), running the
                cross-decoder on that token alone. Default: True with a cache, False without.
            check_inputs: validate ids, lengths and cache room (each check reads a value back to the
                host). An engine that has already checked passes False, which makes a one-token decode
                step free of host synchronisation and so capturable in a CUDA graph.
            targets: (b, t) ids (training, no cache): return their per-token NLL instead of the logits,
                computed without holding the whole logits tensor (`sambay.model.loss.head_nll`).

        Returns:
            (b, t, vocab_size) logits, or (b, 1, vocab_size) when ``last_only``; model dtype. With
            ``targets``: (b, t) fp32 negative log-likelihoods.
        """
        if targets is not None and (cache is not None or last_only or targets.shape != tokens.shape):
            raise ValueError(f"targets {tuple(targets.shape)} need a fresh forward (no cache, not last_only) "
                             f"over tokens of the same shape {tuple(tokens.shape)}")
        if check_inputs:
            span = self._span(tokens, cache, lengths)
        else:
            start = torch.zeros_like(tokens[:, 0]) if cache is None else cache.seqlens
            span = Span.make(start, tokens.shape[1], lengths)
        last_only = cache is not None if last_only is None else last_only
        x = self.embed(tokens).float()  # (b, t, d_model) fp32 residual stream
        x, memory, shared = self.self_decoder(x, span, cache)
        if last_only:  # YOCO: the cross-decoder only needs the token whose logits are wanted
            idx, span = span.last()
            x = x.gather(1, idx.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))  # (b, 1, d_model)
            if memory is not None:
                memory = memory.gather(1, idx.view(-1, 1, 1).expand(-1, 1, memory.shape[-1]))
        x = self.cross_decoder(x, span, memory, shared)
        _, h = self.ops.add_layer_norm(x, None, self.norm.weight, self.norm.bias, self.config.norm_eps)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if targets is not None:
            return head_nll(h, head, targets)
        return F.linear(h, head)

    def _span(self, tokens: Tensor, cache: SambaYCache | None, lengths: Tensor | None) -> Span:
        """Validate the inputs of `forward` and place the new tokens."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be a 2-D integer tensor (b, t), got {_describe(tokens)}")
        b, t = tokens.shape
        if t == 0 or b == 0:
            raise ValueError(f"tokens must hold at least one token per row, got shape {tuple(tokens.shape)}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device).to(torch.long)
            if lengths.shape != (b,):
                raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
            if int(lengths.min()) < 0 or int(lengths.max()) > t:
                raise ValueError(f"lengths must be in [0, {t}], got {lengths.tolist()}")
        if cache is None:
            return Span.make(torch.zeros(b, dtype=torch.long, device=tokens.device), t, lengths)
        self._check_cache(cache, b)
        end = cache.seqlens + (t if lengths is None else lengths)
        if int(end.max()) > cache.max_length:
            raise ValueError(
                f"cache overflow: rows would hold {end.tolist()} tokens but max_length is {cache.max_length}"
            )
        return Span.make(cache.seqlens, t, lengths)

    def _check_cache(self, cache: SambaYCache, b: int) -> None:
        c = self.config
        counts = (len(cache.mamba), len(cache.sliding), len(cache.full))
        expected = tuple(c.count(k) for k in (LayerKind.MAMBA, LayerKind.SLIDING_ATTENTION, LayerKind.FULL_ATTENTION))
        if counts != expected:
            raise ValueError(f"cache was built for another model: (mamba, sliding, full) = {counts}, need {expected}")
        if cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} rows but tokens have {b}")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.ndim}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
