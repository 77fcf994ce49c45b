"""A bounded, async load generator for a running server (`sambay bench-serve`), loopback only.

Sends ``requests`` streaming /v1/completions requests, at most ``concurrency`` in flight, and measures on
the client side, per request: time to first token (send → first chunk with a token), inter-token latency
(gaps between later chunks; the server sends one chunk per generated token), and output tokens (the
usage the server reports). Reports requests/s and output tokens/s over the whole run, and percentiles.
Prompts are synthetic ("word word ..." of a few lengths), so runs are repeatable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
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

    def __post_init__(self):
        host = urlsplit(self.url).hostname or ""
        if host != "localhost" and not _is_loopback(host):
            raise ValueError(f"bench-serve only targets loopback servers (127.0.0.1, ::1, localhost), got {host!r}")
        if self.concurrency < 1 or self.requests < 1 or self.max_tokens < 1:
            raise ValueError("concurrency, requests and max_tokens must be >= 1")


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


async def run_load(config: LoadConfig) -> dict:
    """Send the load; return the report (latencies in milliseconds)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, limits=limits, trust_env=False) as client:
        model = config.model
        if model is None:
            listed = await client.get("/v1/models", timeout=30)
            listed.raise_for_status()
            model = listed.json()["data"][0]["id"]
        gate = asyncio.Semaphore(config.concurrency)

        async def bounded(i: int) -> _Sample:
            async with gate:
                return await _one(client, config, model, i)

        start = time.perf_counter()
        samples = await asyncio.gather(*(bounded(i) for i in range(config.requests)))
        elapsed = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    errors = sorted({s.error for s in samples if s.error})
    return {"model": model, "concurrency": config.concurrency, "requests": config.requests, "completed": len(ok),
            "failed": len(samples) - len(ok), "errors": errors[:5], "duration_s": round(elapsed, 3),
            "requests_per_s": round(len(ok) / elapsed, 3), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / elapsed, 2),
            "ttft_ms": _percentiles([s.ttft for s in ok if s.ttft is not None]),
            "itl_ms": _percentiles([g for s in ok for g in s.gaps])}
