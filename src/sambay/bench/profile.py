"""Where a decode step's time goes: kernel count and GPU time per kernel family (torch.profiler).

An eager step (no CUDA graph) is profiled so every kernel shows up with its own GPU time; comparing the
summed kernel time with the graphed step time separates kernel work from launch and gap overhead.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from sambay.generate.cuda_graphs import compiling
from sambay.model.sambay import SambaY


@torch.inference_mode()
def decode_profile(model: SambaY, batch: int, context: int, steps: int = 3, top: int = 10,
                   compile: bool = False) -> dict:
    """{"kernels_per_step", "kernel_ms_per_step", "top": [(name, ms per step, calls per step)]}.

    ``compile``: the step `GraphedDecoder(compile=True)` captures (inductor's kernels between ours)."""
    cache = model.new_cache(batch_size=batch, max_length=context + steps + 8)
    cache.seqlens.fill_(context)
    tokens = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)

    def forward(tokens):
        return model(tokens, cache, check_inputs=False)

    with compiling(model) if compile else contextlib.nullcontext():
        step = torch.compile(forward, dynamic=False) if compile else forward
        for _ in range(3 if compile else 1):  # warm-up (and compile)
            step(tokens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(tokens)
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:60]
            totals[name][0] += event.device_time_total / 1e3
            totals[name][1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {
        "batch": batch,
        "context": context,
        "compiled": compile,
        "kernels_per_step": sum(c for _, c in totals.values()) / steps,
        "kernel_ms_per_step": sum(t for t, _ in totals.values()) / steps,
        "top": [(name, t / steps, c / steps) for name, (t, c) in ranked[:top]],
    }
