"""The two ceilings every number is judged against, measured on the machine at hand (METHOD.md's advice)."""

from __future__ import annotations

import torch


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graphed_seconds(fn, calls: int, replays: int = 5) -> float:
    """Seconds of one call of ``fn``, as a CUDA graph of ``calls`` back-to-back calls replayed ``replays``
    times (as a decode graph runs them: no launch latency between calls); warmed up and captured first."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * calls)


def copy_bandwidth(n_bytes: int = 4 * 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats=10)
    return 2 * n_bytes / seconds


def matmul_rate(n: int = 8192) -> float:
    """bf16 matrix-product rate in FLOP/s on random data (an n × n × n product)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    seconds = median_seconds(lambda: a @ b, repeats=10)
    return 2 * n**3 / seconds


def measure() -> dict:
    """{"device", "copy_bytes_per_s", "bf16_flops_per_s"}."""
    return {
        "device": torch.cuda.get_device_name(),
        "copy_bytes_per_s": copy_bandwidth(),
        "bf16_flops_per_s": matmul_rate(),
    }
