"""CUDA-graph decode: one captured graph per batch size replays a whole decode step without the host.

A SambaY decode step launches a few hundred small kernels (32 layers × norms, projections, the scan
and attention kernels); launched one by one from Python, launch latency, not memory bandwidth, would
set the speed. The model's decode path has static shapes and never reads a value back to the host
(`SambaY.forward(..., check_inputs=False)` with one token per row), so the whole step, and the
sampling of the next token, can be captured once and replayed (gpt-fast applies `torch.compile` with
CUDA graphs for the same reason).

Sampling inside the graph: greedy where a row's temperature is 0, otherwise the exponential race
(argmax of p / E with E ~ Exp(1), which draws from p) on the device's default generator.

With ``compile=True`` the model's forward is first compiled with `torch.compile` (the pieces between our
custom kernels, see `sambay.ops.for_compile`), then captured the same way: inductor fuses the small ops
that otherwise cost a launch each, and the graph removes the host, as gpt-fast does with its own
"reduce-overhead" mode. The op tables are swapped only while the step is compiled and captured; the
model's eager paths (prefill) are left as they were.

This is the fixed-batch step the benchmarks time (`sambay.bench.runs`) as the baseline of the engine
core; generation itself runs through `sambay.generate.runner`, whose graphs cover batch buckets.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from sambay.cache import SambaYCache
from sambay.model.sambay import SambaY
from sambay.ops import for_compile

# Dynamo compiles a code object once per set of input shapes: one per batch size and cache length. The
# default limit (8) would make a benchmark's or a runner's ninth graph run eagerly under capture, silently.
RECOMPILE_LIMIT = 256


@contextlib.contextmanager
def compiling(model: SambaY):
    """While inside, every module of ``model`` uses the `for_compile` op table; the old ones come back after."""
    owners = [m for m in model.modules() if hasattr(m, "ops")]
    old = [m.ops for m in owners]
    traced = {id(ops): for_compile(ops) for ops in old}
    for m, ops in zip(owners, old, strict=True):
        m.ops = traced[id(ops)]
    try:
        yield
    finally:
        for m, ops in zip(owners, old, strict=True):
            m.ops = ops


def raise_recompile_limit() -> None:
    """Let Dynamo keep a compiled graph per batch size and cache length (`RECOMPILE_LIMIT`)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


def sample_on_device(logits: Tensor, temperature: Tensor) -> Tensor:
    """(b, V) logits, (b,) temperatures → (b,) token ids, without a host sync; 0 means greedy."""
    greedy = logits.argmax(-1)
    scaled = logits.float() / temperature.clamp(min=1e-5).unsqueeze(-1)
    probs = torch.softmax(scaled, dim=-1)
    race = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
    return torch.where(temperature > 0, race, greedy)


class GraphedDecoder:
    """Replays a captured decode step for one static cache (one batch size).

    With ``sample=True`` (the default) the graph also samples: each `step` feeds `tokens` and leaves the
    next tokens in `tokens` and their logits in `logits`. With ``sample=False`` it only computes
    `logits` from `tokens`, for an engine that samples eagerly (per-request seeds, penalties, top-p).

    Capturing runs warm-up steps that write into ``cache``. With ``preserve=False`` the cache is reset
    afterwards (capture first, then prefill); with ``preserve=True`` its contents are saved before and
    restored after, so a cache that already holds a prefill can be captured mid-generation.
    """

    def __init__(self, model: SambaY, cache: SambaYCache, *, sample: bool = True, preserve: bool = False,
                 warmup_steps: int = 2, compile: bool = False):
        if cache.seqlens.device.type != "cuda":
            raise ValueError("GraphedDecoder needs a model and cache on a CUDA device")
        b, device = cache.batch_size, cache.seqlens.device
        self.model, self.cache, self.sample = model, cache, sample
        self._forward = self._logits
        if compile:
            raise_recompile_limit()
            self._forward = torch.compile(self._logits, dynamic=False)
            warmup_steps = max(warmup_steps, 3)  # compiling runs the step once before it is compiled
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=device)  # (b, 1) input of the next step
        self.temperature = torch.zeros(b, device=device)  # (b,) 0 = greedy
        saved = [t.clone() for t in (*cache.tensors(), cache.seqlens)] if preserve else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with compiling(model) if compile else contextlib.nullcontext():
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(warmup_steps):  # compiles kernels, creates cuBLAS handles, outside the capture
                    self._step()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.inference_mode():
                self.logits = self._step()  # (b, vocab_size), a static output buffer
        if saved is None:
            cache.reset()  # block tables included: a paged cache is captured while its rows own no block
        else:
            for t, s in zip((*cache.tensors(), cache.seqlens), saved, strict=True):
                t.copy_(s)
        self.tokens.zero_()

    def _logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, self.cache, check_inputs=False)[:, -1]

    def _step(self) -> Tensor:
        logits = self._forward(self.tokens)
        self.cache.advance(1)
        if self.sample:
            self.tokens.copy_(sample_on_device(logits, self.temperature).view(-1, 1))
        return logits

    def step(self) -> Tensor:
        """Run one decode step for every row; returns `tokens` (b, 1), the tokens just sampled."""
        self.graph.replay()
        return self.tokens
