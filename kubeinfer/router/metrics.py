"""Prometheus metrics of one router, with vLLM's names for the concepts both share.

Request-level figures (TTFT, inter-token latency, end-to-end latency, token counts) are measured
where the router sees the stream; engine gauges and counters come from the replicas' latest
reports. Each Router owns its own registry (no process-global state).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kubeinfer.router.types import ReplicaReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class RouterMetrics:
    """Owns a registry: the router's request metrics plus a collector over replica reports.

    ``reports`` is a callable returning ``{model_name: [ReplicaReport, ...]}`` at scrape time.
    """

    def __init__(self, reports) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ("model_name",)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.requests = Counter("kubeinfer:router_requests", "Requests by outcome.",
                                ("model_name", "outcome"), registry=r)
        self.retries = Counter("kubeinfer:router_retries", "Requests retried on another replica.",
                               labels, registry=r)
        self.in_flight = Gauge("kubeinfer:router_requests_in_flight", "Requests running on replicas.",
                               registry=r)
        self.queued = Gauge("kubeinfer:router_requests_queued", "Requests waiting for admission.",
                            registry=r)
        self.batch_size = Histogram("kubeinfer:router_batch_size", "Requests per replica call.", labels,
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        r.register(_ReplicaCollector(reports))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector:
    """Sums the replicas' latest reports into vLLM's engine metrics at scrape time."""

    def __init__(self, reports) -> None:
        self._reports = reports

    def collect(self) -> Iterable:
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engines' running batch.",
                                    labels=["model_name"])
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting in the engines.",
                                    labels=["model_name"])
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full (mean over replicas).",
                               labels=["model_name"])
        replicas = GaugeMetricFamily("kubeinfer:replicas_reporting", "Replicas heard from in the last minute.",
                                     labels=["model_name"])
        preempt = CounterMetricFamily("vllm:num_preemptions", "Preemptions (replicas heard from).",
                                      labels=["model_name"])
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", labels=["model_name"])
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prefix-cache queries, in tokens.",
                                      labels=["model_name"])
        for model, reports in self._reports().items():
            reports: list[ReplicaReport]
            n = max(len(reports), 1)
            running.add_metric([model], sum(r.num_requests_running for r in reports))
            waiting.add_metric([model], sum(r.num_requests_waiting for r in reports))
            kv.add_metric([model], sum(r.kv_cache_usage for r in reports) / n)
            replicas.add_metric([model], len(reports))
            preempt.add_metric([model], sum(r.num_preemptions for r in reports))
            hits.add_metric([model], sum(r.prefix_cache_hits for r in reports))
            queries.add_metric([model], sum(r.prefix_cache_queries for r in reports))
        return [running, waiting, kv, replicas, preempt, hits, queries]
