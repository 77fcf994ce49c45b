"""A bounded, async load generator for a running server (`sambay bench-serve`), loopback only.

Sends ``requests`` streaming /v1/completions requests and measures on the client side, per request: time
to first token (send → first chunk with a token), inter-token latency (gaps between later chunks; the
server sends one chunk per generated token), end-to-end latency (send → ``[DONE]``), and the prompt and
output tokens of the usage the server reports. Reports requests/s and output tokens/s over the whole run,
percentiles, the failures by message, and, given the served model's config and weight bytes, the decode
bandwidth limit at the run's mean context and the fraction of it reached (`decode_limit`).

Notable features:

- Two ways to load the server: a fixed ``concurrency`` (closed loop: a request starts when one ends), or
  a ``request_rate`` (open loop: Poisson arrivals, exponential gaps from a seeded ``random.Random``),
  where ``concurrency``, if set, caps the requests in flight. Either way the load is bounded: a fixed
  number of requests, each with a timeout.
- Prompts are synthetic and repeatable: ``"word word ..."`` of some words, or a list of token ids of
  some length (`prompt_ids`), so that a prompt of N tokens is exactly N tokens for any tokenizer.
- Workloads (`WORKLOADS`): ``default`` (short prompts, 64 output tokens) and ``paper`` (2,048-token
  prompts, 32,768 output tokens, greedy: the long-reasoning generation the model is for).
- Server-Sent Events are parsed per the HTML spec (`SSEDecoder`): lines end only at CR, LF or CRLF.
  httpx's ``aiter_lines`` also splits at U+2028, U+2029 and U+0085 (``str.splitlines``), which a JSON
  string may hold unescaped, and would cut such a chunk in two.
- A Python client spends a few hundred µs of CPU per streamed token (HTTP parsing, JSON), so one process
  saturates a core at a few thousand tokens/s: at high concurrency the load is split over ``workers``
  processes (default: one per 16 streams, at most the CPU count), which start together from one
  schedule of arrivals and whose samples are merged, so the report measures the server, not the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import multiprocessing
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import httpx

from sambay.bench.limits import decode_bytes
from sambay.checkpoint import config_from_hf
from sambay.config import SambaYConfig

H200_BANDWIDTH = 4.3e12  # bytes/s an H200 moves in a device copy in practice (the HBM3e peak is 4.8e12)
# Token ids 64..89 are the single bytes "a".."z" in every byte-level BPE vocabulary with GPT-2's byte
# order (o200k and the Phi-4 vocabularies, the 384-token default model's too): valid ids, ordinary text.
PROMPT_TOKEN_IDS = range(64, 90)
WORKLOADS = {  # LoadConfig fields of each named workload; explicit settings override them
    "default": {"prompt_lengths": (16, 64, 128), "prompt_unit": "words", "max_tokens": 64, "temperature": 0.0},
    "paper": {"prompt_lengths": (2048,), "prompt_unit": "tokens", "max_tokens": 32768, "temperature": 0.0,
              "timeout_s": 3600.0},
}


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """What load to send.

    With ``request_rate`` None, ``concurrency`` requests are in flight at all times (closed loop). With a
    rate, requests arrive as a Poisson process of that many per second, and ``concurrency`` (None: no cap)
    caps those in flight. Latencies count from the send: an arrival's wait for the cap is not counted.
    """

    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    concurrency: int | None = 8
    request_rate: float | None = None  # requests/s; None: closed loop at ``concurrency``
    requests: int = 64
    prompt_lengths: tuple[int, ...] = (16, 64, 128)  # cycled over the requests
    prompt_unit: Literal["words", "tokens"] = "words"
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0  # of the arrival times and the token-id prompts
    api_key: str | None = None
    timeout_s: float = 300.0  # per request, from send to [DONE]
    workers: int | None = None  # client processes; None: one per 16 in flight, at most the CPU count
    json_schema: dict | None = None  # sent with every request as its response_format (the cost of a grammar)

    def __post_init__(self):
        host = urlsplit(self.url).hostname or ""
        if host != "localhost" and not _is_loopback(host):
            raise ValueError(f"bench-serve only targets loopback servers (127.0.0.1, ::1, localhost), got {host!r}")
        if self.requests < 1 or self.max_tokens < 1 or min(self.prompt_lengths, default=0) < 1:
            raise ValueError("requests, max_tokens and every prompt length must be >= 1")
        if self.request_rate is None and self.concurrency is None:
            raise ValueError("a closed-loop run (no request rate) needs a concurrency")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"the request rate must be > 0, got {self.request_rate}")
        if self.timeout_s <= 0:
            raise ValueError(f"the timeout must be > 0, got {self.timeout_s}")
        if self.workers is not None and not 1 <= self.workers <= self.max_in_flight:
            raise ValueError(f"workers must be in [1, {self.max_in_flight}] (the requests in flight at most), "
                             f"got {self.workers}")

    @property
    def max_in_flight(self) -> int:
        return min(self.concurrency or self.requests, self.requests)

    @property
    def processes(self) -> int:
        if self.workers is not None:
            return self.workers
        return max(1, min(os.cpu_count() or 1, -(-self.max_in_flight // 16)))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Server-Sent Events --------------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")  # UTF-8 never has 0x0A / 0x0D inside a character: split the bytes


class SSEDecoder:
    """Incremental Server-Sent Events parser (HTML spec §9.2.6): bytes in, each event's data out.

    Lines end at CR, LF or CRLF only, also when a CRLF is cut between two network chunks; each line is
    decoded as UTF-8 once whole, so a character cut between chunks is decoded whole. ``data:`` fields
    (one optional space after the colon) of one event join with LF; a blank line dispatches the event;
    comments (``:`` first) and other fields (``event``, ``id``, ``retry``) are skipped.
    """

    def __init__(self):
        self._buffer = b""  # the start of a line whose end has not arrived
        self._data: list[str] = []  # the data lines of the event being read
        self._skip_lf = False  # the last chunk ended in CR: a LF opening the next one ends no new line
        self._started = False

    def feed(self, chunk: bytes) -> list[str]:
        """Parse the next bytes of the stream; returns the data of the events they complete."""
        if not chunk:
            return []
        if not self._started:
            self._started, chunk = True, chunk.removeprefix(b"\xef\xbb\xbf")  # a BOM may open the stream
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = chunk.endswith(b"\r")
        lines = _LINE_END.split(self._buffer + chunk if self._buffer else chunk)
        self._buffer = lines.pop()
        events = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value.removeprefix(" "))
        return events


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The data of each event of a byte stream (e.g. ``response.aiter_bytes()``), per `SSEDecoder`."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for data in decoder.feed(chunk):
            yield data


# requests ------------------------------------------------------------------------------------------


def prompt_ids(length: int, index: int, seed: int) -> list[int]:
    """The token-id prompt of request ``index``: ``length`` ids from `PROMPT_TOKEN_IDS`, repeatable from
    ``seed`` and different per request (no two requests share a prefix a server could cache)."""
    rng = random.Random(seed * 1_000_003 + index)
    return rng.choices(PROMPT_TOKEN_IDS, k=length)


def arrival_offsets(requests: int, rate: float | None, seed: int) -> list[float]:
    """When each request is sent, in seconds from the start: all at 0 (closed loop, the concurrency paces
    them) or a Poisson process of ``rate`` per second (exponential gaps, the first request at 0)."""
    if rate is None:
        return [0.0] * requests
    rng, offsets, t = random.Random(seed), [], 0.0
    for _ in range(requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def _body(config: LoadConfig, model: str, index: int) -> dict:
    length = config.prompt_lengths[index % len(config.prompt_lengths)]
    prompt = prompt_ids(length, index, config.seed) if config.prompt_unit == "tokens" else " ".join(["word"] * length)
    body = {"model": model, "prompt": prompt, "max_tokens": config.max_tokens, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if config.json_schema is not None:
        schema = {"name": "bench", "schema": config.json_schema}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


@dataclass
class _Sample:
    ok: bool = False
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    latency: float = 0.0  # send → [DONE], or → the failure
    prompt_tokens: int = 0
    tokens: int = 0
    error: str | None = None


async def _one(client: httpx.AsyncClient, config: LoadConfig, model: str, index: int) -> _Sample:
    sample, start = _Sample(), time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, config, _body(config, model, index), sample, start), config.timeout_s)
    except TimeoutError:
        sample.error = f"timed out after {config.timeout_s:g} s"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    sample.latency, sample.ok = time.perf_counter() - start, sample.error is None
    return sample


async def _stream(client: httpx.AsyncClient, config: LoadConfig, body: dict, sample: _Sample, start: float) -> None:
    """Send one request and read its stream into ``sample``; sets ``sample.error`` on a failure."""
    async with client.stream("POST", "/v1/completions", json=body, timeout=config.timeout_s) as response:
        if response.status_code != 200:
            sample.error = f"HTTP {response.status_code}: {_error_message(await response.aread())}"
            return
        last = None
        async for data in sse_data(response.aiter_bytes()):
            if data == "[DONE]":
                return
            chunk, now = json.loads(data), time.perf_counter()
            if "error" in chunk:
                sample.error = f"error event: {chunk['error'].get('message')}"
                return
            if chunk.get("usage"):
                sample.prompt_tokens = chunk["usage"]["prompt_tokens"]
                sample.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                if last is None:
                    sample.ttft = now - start
                else:
                    sample.gaps.append(now - last)
                last = now
    sample.error = "the stream ended without [DONE]"


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-format error body, else the body's start."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", errors="replace")


async def _model_name(config: LoadConfig) -> str:
    if config.model is not None:
        return config.model
    async with httpx.AsyncClient(base_url=config.url, headers=_headers(config), trust_env=False) as client:
        listed = await client.get("/v1/models", timeout=30)
        listed.raise_for_status()
        return listed.json()["data"][0]["id"]


def _headers(config: LoadConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _drive(config: LoadConfig, model: str, schedule: list[tuple[int, float]], cap: int | None,
                 start_at: float) -> list[_Sample]:
    """Send request i at wall-clock time ``start_at`` + its offset, for each (i, offset) of ``schedule``,
    with at most ``cap`` in flight (None: no cap)."""
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    async with httpx.AsyncClient(base_url=config.url, headers=_headers(config), limits=limits,
                                 trust_env=False) as client:
        gate = asyncio.Semaphore(cap) if cap else contextlib.nullcontext()

        async def send(i: int, offset: float) -> _Sample:
            await asyncio.sleep(max(0.0, start_at + offset - time.time()))
            async with gate:
                return await _one(client, config, model, i)

        return await asyncio.gather(*(send(i, offset) for i, offset in schedule))


def _worker(config: LoadConfig, model: str, schedule: list[tuple[int, float]], cap: int | None,
            start_at: float) -> list[_Sample]:
    return asyncio.run(_drive(config, model, schedule, cap, start_at))


async def run_load(config: LoadConfig, footprint: ModelFootprint | None = None,
                   bandwidth: float = H200_BANDWIDTH) -> dict:
    """Send the load; return the report (latencies in milliseconds).

    Args:
        config: the load.
        footprint: the served model's config and weight bytes; None leaves the bandwidth limit out.
        bandwidth: the accelerator's memory bandwidth in bytes/s, for the limit.
    """
    model = await _model_name(config)
    schedule = list(enumerate(arrival_offsets(config.requests, config.request_rate, config.seed)))
    n = config.processes
    if n == 1:
        start = time.time()
        samples = await _drive(config, model, schedule, config.concurrency, start)
    else:  # processes started together; worker w sends requests w, w + n, ... with its share of the cap
        start = time.time() + 5.0  # after every worker has started and imported its client
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            shares = [loop.run_in_executor(pool, _worker, config, model, schedule[w::n],
                                           config.concurrency and len(range(w, config.concurrency, n)), start)
                      for w in range(n)]
            samples = [s for share in await asyncio.gather(*shares) for s in share]
    report = _summary(config, model, samples, time.time() - start, n)
    if footprint is not None and report["mean_in_flight"] > 0 and report["completed"]:
        report["bandwidth_limit"] = decode_limit(footprint, bandwidth, batch=report["mean_in_flight"],
                                                 prompt_tokens=report["mean_prompt_tokens"],
                                                 output_tokens=report["mean_output_tokens"],
                                                 output_tokens_per_s=report["output_tokens_per_s"])
    return report


# the report ----------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": round(sum(ordered) / len(ordered) * 1000, 3)}


def _summary(config: LoadConfig, model: str, samples: list[_Sample], elapsed: float, processes: int) -> dict:
    """The report of a run. ``mean_in_flight`` is the concurrency reached (Little's law: the requests'
    summed latency over the run's duration); the most frequent 10 error messages are listed with counts."""
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    errors = Counter(s.error for s in samples if s.error)
    return {"model": model, "concurrency": config.concurrency, "request_rate": config.request_rate,
            "requests": config.requests, "prompt_unit": config.prompt_unit, "prompt_lengths": config.prompt_lengths,
            "max_tokens": config.max_tokens, "completed": len(ok), "failed": len(samples) - len(ok),
            "errors": dict(errors.most_common(10)), "client_processes": processes,
            "duration_s": round(elapsed, 3), "requests_per_s": round(len(ok) / elapsed, 3),
            "output_tokens": tokens, "output_tokens_per_s": round(tokens / elapsed, 2),
            "mean_prompt_tokens": round(sum(s.prompt_tokens for s in ok) / max(len(ok), 1), 1),
            "mean_output_tokens": round(tokens / max(len(ok), 1), 1),
            "mean_in_flight": round(sum(s.latency for s in samples) / elapsed, 3),
            "ttft_ms": _percentiles([s.ttft for s in ok if s.ttft is not None]),
            "itl_ms": _percentiles([g for s in ok for g in s.gaps]),
            "latency_ms": _percentiles([s.latency for s in ok])}


@dataclass(frozen=True)
class ModelFootprint:
    """What the bandwidth limit needs to know of the served model (the load generator never loads it)."""

    config: SambaYConfig
    weight_bytes: int

    @classmethod
    def read(cls, model_dir: Path) -> ModelFootprint:
        """From a checkpoint directory: config.json, and the weights' bytes (the safetensors index's
        ``total_size``, else the sizes of the .safetensors files)."""
        config = config_from_hf(json.loads((Path(model_dir) / "config.json").read_text()))
        index = Path(model_dir) / "model.safetensors.index.json"
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size") if index.exists() else None
        weight_bytes = total or sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        if not weight_bytes:
            raise ValueError(f"{model_dir} holds no .safetensors weights")
        return cls(config, int(weight_bytes))


def decode_limit(footprint: ModelFootprint, bandwidth: float, *, batch: float, prompt_tokens: float,
                 output_tokens: float, output_tokens_per_s: float) -> dict:
    """The output tokens/s a memory-bound decode cannot exceed at the run's mean batch and context, and
    the fraction of it reached.

    A decode step of ``batch`` rows moves at least `decode_bytes` (weights once, plus each row's state and
    KV) and makes ``batch`` tokens, so it makes at most ``batch * bandwidth / decode_bytes`` tokens/s. A
    request's context grows from its prompt to prompt + output, so the mean context over its decode is the
    prompt plus half the output.

    Args:
        footprint: the served model.
        bandwidth: memory bandwidth in bytes/s.
        batch: the mean rows in flight (fractional: a mean).
        prompt_tokens: mean prompt tokens per request.
        output_tokens: mean output tokens per request.
        output_tokens_per_s: the throughput reached.

    Returns:
        ``mean_context``, ``batch``, ``bandwidth_bytes_per_s``, ``weight_bytes``,
        ``limit_output_tokens_per_s`` and ``fraction_of_limit``.
    """
    context = round(prompt_tokens + output_tokens / 2)
    limit = batch * bandwidth / decode_bytes(footprint.config, footprint.weight_bytes, batch, context)
    return {"mean_context": context, "batch": batch, "bandwidth_bytes_per_s": bandwidth,
            "weight_bytes": footprint.weight_bytes, "limit_output_tokens_per_s": round(limit, 1),
            "fraction_of_limit": output_tokens_per_s / limit}
