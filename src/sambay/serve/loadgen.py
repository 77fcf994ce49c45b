"""A bounded, async load generator for a running server (`sambay bench-serve`), loopback only.

Sends ``requests`` streaming /v1/completions requests, at most ``concurrency`` in flight, and measures on
the client side, per request: time to first token (send → first chunk with a token), inter-token latency
(gaps between later chunks; the server sends one chunk per generated token), and output tokens (the
usage the server reports). Reports requests/s and output tokens/s over the whole run, and percentiles.
Prompts are synthetic ("word word ..." of a few lengths), so runs are repeatable.

A Python client spends a few hundred µs of CPU per streamed token (HTTP parsing, JSON), so one process
saturates a core at a few thousand tokens/s: at high concurrency the load is split over ``workers``
processes (default: one per 16 streams, at most the CPU count), which start together and whose samples
are merged, so the report measures the server, not the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """What load to send."""

    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    concurrency: int = 8
    requests: int = 64
    prompt_words: tuple[int, ...] = (16, 64, 128)  # prompt lengths, cycled
    max_tokens: int = 64
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 300.0  # per request
    workers: int | None = None  # client processes; None: one per 16 in flight, at most the CPU count

    def __post_init__(self):
        host = urlsplit(self.url).hostname or ""
        if host != "localhost" and not _is_loopback(host):
            raise ValueError(f"bench-serve only targets loopback servers (127.0.0.1, ::1, localhost), got {host!r}")
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, requests and max_tokens must be >= 1")
        if self.workers is not None and not 1 <= self.workers <= self.concurrency:
            raise ValueError(f"workers must be in [1, concurrency = {self.concurrency}], got {self.workers}")

    @property
    def processes(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, min(os.cpu_count() or 1, -(-self.concurrency // 16), self.requests))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Sample:
    ok: bool = False
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def _one(client: httpx.AsyncClient, config: LoadConfig, model: str, index: int) -> _Sample:
    words = config.prompt_words[index % len(config.prompt_words)]
    body = {"model": model, "prompt": " ".join(["word"] * words), "max_tokens": config.max_tokens,
            "temperature": config.temperature, "stream": True, "stream_options": {"include_usage": True}}
    sample, start, last = _Sample(), time.perf_counter(), None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=config.timeout_s) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter()
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    sample.ttft = now - start
                else:
                    sample.gaps.append(now - last)
                last = now
        sample.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    return sample


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": round(sum(ordered) / len(ordered) * 1000, 3)}


async def _model_name(config: LoadConfig) -> str:
    if config.model is not None:
        return config.model
    async with httpx.AsyncClient(base_url=config.url, headers=_headers(config), trust_env=False) as client:
        listed = await client.get("/v1/models", timeout=30)
        listed.raise_for_status()
        return listed.json()["data"][0]["id"]


def _headers(config: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _drive(config: LoadConfig, model: str, indices: range, concurrency: int, start_at: float) -> list[_Sample]:
    """Send requests ``indices`` with ``concurrency`` in flight, from wall-clock time ``start_at``."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=config.url, headers=_headers(config), limits=limits,
                                 trust_env=False) as client:
        gate = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> _Sample:
            async with gate:
                return await _one(client, config, model, i)

        await asyncio.sleep(max(0.0, start_at - time.time()))
        return await asyncio.gather(*(bounded(i) for i in indices))


def _worker(config: LoadConfig, model: str, indices: range, concurrency: int, start_at: float) -> list[_Sample]:
    return asyncio.run(_drive(config, model, indices, concurrency, start_at))


async def run_load(config: LoadConfig) -> dict:
    """Send the load; return the report (latencies in milliseconds)."""
    model = await _model_name(config)
    n = config.processes
    if n == 1:
        start = time.time()
        samples = await _drive(config, model, range(config.requests), config.concurrency, start)
    else:  # processes started together; worker w sends requests w, w + n, ... with its share of the streams
        start = time.time() + 5.0  # after every worker has started and imported its client
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            shares = [loop.run_in_executor(pool, _worker, config, model, range(w, config.requests, n),
                                           len(range(w, config.concurrency, n)), start) for w in range(n)]
            samples = [s for share in await asyncio.gather(*shares) for s in share]
    elapsed = time.time() - start
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    errors = sorted({s.error for s in samples if s.error})
    return {"model": model, "concurrency": config.concurrency, "requests": config.requests, "completed": len(ok),
            "failed": len(samples) - len(ok), "errors": errors[:5], "client_processes": n,
            "duration_s": round(elapsed, 3), "requests_per_s": round(len(ok) / elapsed, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 2),
            "ttft_ms": _percentiles([s.ttft for s in ok if s.ttft is not None]),
            "itl_ms": _percentiles([g for s in ok for g in s.gaps])}
