"""Prometheus metrics of the server (``GET /metrics``), in a registry of its own (one per app).

    sambay_http_requests_total{path,status}     HTTP responses by route template ("unmatched": no route) and status
    sambay_transport_refusals_total{reason}     what the transport answers itself (`transport`): body_too_large,
                                                body_timeout, head_too_large, head_timeout, too_many_connections
    sambay_prompt_tokens_total                  prompt tokens admitted to the queue
    sambay_generation_tokens_total              tokens generated (all samples)
    sambay_requests_running / _waiting          requests holding slots / queued for one
    sambay_cache_slots, sambay_cache_bytes      the memory budget decided at start
    sambay_kv_blocks, sambay_kv_blocks_free     blocks of the paged shared K/V: all, and free now
    sambay_preemptions                          requests preempted (K/V blocks exhausted) and recomputed
    sambay_prefix_cache_queries_total           prompt tokens looked up in the prefix cache
    sambay_prefix_cache_hits_total              prompt tokens served from it (not prefilled)
    sambay_prefix_cache_snapshots               state snapshots held, of sambay_prefix_cache_snapshot_entries
    sambay_prefix_cache_snapshot_bytes          bytes of the snapshot pool (allocated at start)
    sambay_queue_time_seconds                   submit → admitted to a slot
    sambay_time_to_first_token_seconds          submit → first token
    sambay_inter_token_latency_seconds          between consecutive steps of one request
    sambay_request_latency_seconds              submit → last token
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from sambay.generate.core import EngineCore
from sambay.generate.requests import Output, Request

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's counters, gauges and latency histograms."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, scheduler: EngineCore):
        r = self.registry = CollectorRegistry()
        self.http = Counter("sambay_http_requests", "HTTP responses", ["path", "status"], registry=r)
        self.refusals = Counter("sambay_transport_refusals", "Requests and connections refused by the transport",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("sambay_prompt_tokens", "Prompt tokens admitted to the queue", registry=r)
        self.generation_tokens = Counter("sambay_generation_tokens", "Generated tokens", registry=r)
        for name, key, doc in (("requests_running", "running", "Requests holding slots"),
                               ("requests_waiting", "waiting", "Requests queued for a slot"),
                               ("kv_blocks_free", "free_blocks", "Free blocks of the shared K/V"),
                               ("preemptions", "preemptions", "Requests preempted and recomputed")):
            gauge = Gauge(f"sambay_{name}", doc, registry=r)
            gauge.set_function(lambda key=key: scheduler.stats()[key])
        for name, key, doc in (("prefix_cache_snapshots", "prefix_cache_snapshots", "Prefix-cache snapshots held"),
                               ("prefix_cache_snapshot_entries", "prefix_cache_entries",
                                "Prefix-cache snapshots the pool holds")):
            gauge = Gauge(f"sambay_{name}", doc, registry=r)
            gauge.set_function(lambda key=key: scheduler.stats()[key])
        Gauge("sambay_prefix_cache_snapshot_bytes", "Bytes of the prefix cache's snapshot pool", registry=r).set(
            scheduler.stats()["prefix_cache_entries"] * scheduler.memory.bytes_per_slot)
        r.register(_PrefixCounters(scheduler))
        Gauge("sambay_kv_blocks", f"Blocks of the shared K/V ({scheduler.memory.block_size} tokens each)",
              registry=r).set(scheduler.memory.kv_blocks)
        Gauge("sambay_cache_slots", "Cache slots (max concurrent sequences)", registry=r).set(scheduler.memory.slots)
        Gauge("sambay_cache_bytes", "Cache bytes, all slots", registry=r).set(scheduler.memory.total_bytes)
        self.queue_time = Histogram("sambay_queue_time_seconds", "Submit to slot", buckets=_LATENCY, registry=r)
        self.ttft = Histogram("sambay_time_to_first_token_seconds", "Submit to first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("sambay_inter_token_latency_seconds", "Between steps of one request", buckets=_LATENCY,
                             registry=r)
        self.latency = Histogram("sambay_request_latency_seconds", "Submit to last token", buckets=_LATENCY,
                                 registry=r)

    def observe(self, request: Request, output: Output, previous: float | None) -> None:
        """Account for one output of ``request``; ``previous`` is the time of its last output, if any."""
        timing = request.timing
        if output.deltas:
            self.generation_tokens.inc(len(output.deltas))
            if previous is None:
                self.ttft.observe(output.time - timing.arrival)
                if timing.admitted is not None:
                    self.queue_time.observe(timing.admitted - timing.arrival)
            else:
                self.itl.observe(output.time - previous)
        if output.finished and output.error is None and output.deltas:
            self.latency.observe(output.time - timing.arrival)

    def transport_refused(self, reason: str) -> None:
        """Count a refusal the transport answered itself (it never reaches the app's response counter)."""
        self.refusals.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCounters:
    """The prefix cache's token counters, read from the scheduler's stats at each scrape."""

    def __init__(self, scheduler: EngineCore):
        self.scheduler = scheduler

    def collect(self):
        stats = self.scheduler.stats()
        yield CounterMetricFamily("sambay_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=stats["prefix_cache_queries"])
        yield CounterMetricFamily("sambay_prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                  value=stats["prefix_cache_hits"])
