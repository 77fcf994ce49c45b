"""Timed runs of our engine: decode steps at a fixed context, YOCO prefill, and a real long generation.

The long generation goes through the engine core, as users' generations do; the fixed-context decode
step is a microbenchmark of the model's graphed step alone (the baseline the core is measured against).

Decode is timed at a fixed context (METHOD.md): a cache is filled with random state and its lengths set
to ``context``, then the CUDA-graph decode step is replayed ``steps`` times between two CUDA events
(each replay moves the context by one token, which is noise at these lengths). Without a GPU the same
code times eager steps, which is only useful as a smoke test.
"""

from __future__ import annotations

import time

import torch

from sambay.generate.cuda_graphs import GraphedDecoder
from sambay.model.sambay import SambaY


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fill(cache) -> None:
    """Random state instead of zeros, so nothing runs faster than it would on real data."""
    for t in cache.tensors():
        if t.is_floating_point():
            t.normal_(0.0, 0.5)


@torch.inference_mode()
def decode_step_seconds(model: SambaY, batch: int, context: int, steps: int, graphs: bool,
                        compile: bool = False) -> float:
    """Seconds per decode step of ``batch`` rows at ``context`` tokens already in the cache (``compile``: the
    `torch.compile`d step under the same CUDA graph, `GraphedDecoder(compile=True)`)."""
    cache = model.new_cache(batch_size=batch, max_length=context + steps + 8)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)
    if graphs:
        decoder = GraphedDecoder(model, cache, compile=compile)
        decoder.tokens.copy_(tokens)
        run = decoder.step
    else:
        def run():
            return model(tokens, cache, check_inputs=False)
    _fill(cache)
    cache.seqlens.fill_(context)
    run()
    _sync()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        seconds = time.perf_counter() - t0
    return seconds / steps


@torch.inference_mode()
def prefill_seconds(model: SambaY, tokens: int, repeats: int = 3) -> float:
    """Median seconds of a batch-1 YOCO prefill of ``tokens`` tokens into a fresh cache."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
    times = []
    for i in range(repeats + 1):
        cache = model.new_cache(batch_size=1, max_length=tokens)
        _sync()
        t0 = time.perf_counter()
        model(ids, cache)
        _sync()
        if i:  # the first run compiles kernels
            times.append(time.perf_counter() - t0)
        del cache
    return sorted(times)[len(times) // 2]


def long_generation(model: SambaY, batch: int, prompt: int, new_tokens: int) -> dict:
    """A real run through the engine core (`Engine.stream`, what `sambay generate` runs): ``batch`` random
    prompts of ``prompt`` tokens, ``new_tokens`` greedy tokens each; prefill = time to the first tokens."""
    from sambay.generate import Engine, SamplingParams

    engine = Engine(model)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_token_ids=())
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt)).tolist()
    list(engine.stream(prompts, params.replace(max_new_tokens=2)))  # builds the core (cache, graphs)
    _sync()
    t0 = time.perf_counter()
    stream = engine.stream(prompts, params)
    next(stream)
    _sync()
    t1 = time.perf_counter()
    for _ in stream:
        pass
    _sync()
    t2 = time.perf_counter()
    return {"batch": batch, "prompt": prompt, "new_tokens": new_tokens, "prefill_s": t1 - t0,
            "decode_s": t2 - t1, "tokens_per_s": batch * (new_tokens - 1) / (t2 - t1)}
