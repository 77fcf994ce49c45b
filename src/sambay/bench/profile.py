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


def _by_name(prof, cuda: bool) -> dict[str, list[float]]:
    """{name (first 60 characters): [ms, calls]} of a profile: GPU kernels' device time, or on the CPU the
    operators' self time."""
    if cuda:
        gpu = torch.autograd.DeviceType.CUDA
        events = [(e.name, e.device_time_total, 1) for e in prof.events() if e.device_type == gpu]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us, calls in events:
        totals[name[:60]][0] += us / 1e3
        totals[name[:60]][1] += calls
    return totals


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
    totals = _by_name(prof, cuda=True)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {
        "batch": batch,
        "context": context,
        "compiled": compile,
        "kernels_per_step": sum(c for _, c in totals.values()) / steps,
        "kernel_ms_per_step": sum(t for t, _ in totals.values()) / steps,
        "top": [(name, t / steps, c / steps) for name, (t, c) in ranked[:top]],
    }


@torch.inference_mode()
def prefill_profile(model: SambaY, tokens: int, top: int = 25) -> dict:
    """Where a batch-1 prefill of ``tokens`` tokens spends its time: {"context", "kernels", "kernel_ms",
    "top": [(name, ms, calls)], "families": {family: ms}}, after one unprofiled warm-up prefill.

    Kernel time on a GPU (device events), operator self time on the CPU. Families group the names by what they
    do (matmul, attention, scan, conv, norm, elementwise/copy, other), so the 32K prefill's distance from
    the matmul rate (issue 14) can be split into work and overhead."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=model.device)
    cuda = model.device.type == "cuda"

    def run():
        model(ids, model.new_cache(batch_size=1, max_length=tokens))
        if cuda:
            torch.cuda.synchronize()

    run()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
    totals = _by_name(prof, cuda)
    families: dict[str, float] = defaultdict(float)
    for name, (ms, _) in totals.items():
        families[kernel_family(name)] += ms
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return {
        "batch": 1,
        "context": tokens,
        "kernels": sum(c for _, c in totals.values()),
        "kernel_ms": sum(t for t, _ in totals.values()),
        "top": [(name, t, c) for name, (t, c) in ranked[:top]],
        "families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
    }


_FAMILIES = (  # (family, substrings of a kernel or operator name); first match wins
    ("attention", ("attention", "_prefill", "_decode", "_combine", "flash", "fmha", "sdpa", "softmax")),
    ("scan", ("scan", "_state_update", "selective", "_lookback", "_single_pass", "_chunk_state", "_chunk_combine",
              "_chunk_output")),
    ("conv", ("conv",)),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90_xmma", "matmul", "aten::mm", "aten::addmm", "linear",
                "splitk")),
    ("norm", ("norm",)),
    ("elementwise/copy", ("elementwise", "copy", "cat", "index", "fill", "memset", "memcpy", "triton_poi",
                          "aten::add", "aten::mul", "aten::to", "swiglu", "silu")),
)


def kernel_family(name: str) -> str:
    """The family of a kernel or operator name (`_FAMILIES`), "other" when none matches."""
    low = name.lower()
    return next((family for family, keys in _FAMILIES if any(k in low for k in keys)), "other")
