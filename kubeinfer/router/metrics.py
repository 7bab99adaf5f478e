"""Prometheus metrics of one router, with vLLM's names, meanings and units for the concepts both share.

Request-level figures (latencies, phases, token counts, outcomes) are recorded where the router sees
a request end; the engine's phases (queue, prefill, decode) come with the last chunk, measured on the
engine's own clock. Engine gauges and counters come from the replicas' reports at scrape time. Each
Router owns its own registry (no process-global state).

Which of inference-perf's vLLM metrics are exported, and why the others are not, is listed in
tests/test_vllm_metrics.py (which checks each is present).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from kubeinfer.router.types import Chunk, ReplicaReport
from kubeinfer.worker.outputs import ITERATION_TOKENS_BUCKETS
from kubeinfer.worker.speculative import MAX_SPECULATIVE_TOKENS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets, each reaching past 30 minutes where a request-level latency can (a long queue,
# a slow CPU node): a p90 beyond the last finite bucket would be reported as that bucket's bound.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                         10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                           30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, ..., 5e6


class RouterMetrics:
    """Owns a registry: the router's request metrics plus a collector over replica reports.

    ``reports`` is a callable returning ``{model_name: [ReplicaReport, ...]}`` (the replicas heard
    from recently) at scrape time.
    """

    def __init__(self, reports) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("model_name",)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between streamed tokens.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "A request's mean time per output token after the first (its decode time over "
                              "its output tokens less one).", TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Time a request waited: in the router's admission queue, then in the "
                                    "engine until first scheduled.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Engine time from first scheduled to first token.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Engine time from first token to last token.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Engine time from first scheduled to last token (prefill + decode).",
                                        REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Generated tokens per finished request.", TOKEN_COUNT_BUCKETS)
        self.request_max_tokens = histogram("vllm:request_params_max_tokens",
                                            "The max_tokens each finished request ran with.", TOKEN_COUNT_BUCKETS)
        self.request_params_n = histogram("vllm:request_params_n", "The n (choices) of each finished request.",
                                          (1, 2, 5, 10, 20))
        self.request_prefill_computed = histogram("vllm:request_prefill_kv_computed_tokens",
                                                  "Prompt tokens a finished request computed (not from the "
                                                  "prefix cache).", TOKEN_COUNT_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated by finished requests.",
                                         labels, registry=r)
        self.prompt_tokens_cached = Counter("vllm:prompt_tokens_cached",
                                            "Prompt tokens of finished requests served from the prefix cache.",
                                            labels, registry=r)
        self.request_success = Counter("vllm:request_success", "Requests that ended, by finish reason "
                                       "(stop, length, abort: the client went away).",
                                       ("model_name", "finished_reason"), registry=r)
        self.requests = Counter("kubeinfer:router_requests", "Requests by outcome.",
                                ("model_name", "outcome"), registry=r)
        self.retries = Counter("kubeinfer:router_retries", "Requests retried on another replica.",
                               labels, registry=r)
        self.in_flight = Gauge("kubeinfer:router_requests_in_flight", "Requests running on replicas.",
                               registry=r)
        self.queued = Gauge("kubeinfer:router_requests_queued", "Requests waiting for admission.",
                            registry=r)
        self.waiting_for_capacity = Gauge(
            "kubeinfer:requests_waiting_for_capacity", "Admitted requests whose call has not reached a replica "
            "yet (a model scaled to zero waits here while a replica starts).", labels, registry=r)
        self.capacity_timeouts = Counter(
            "kubeinfer:capacity_wait_timeouts", "Requests answered UNAVAILABLE because no replica took their "
            "call within max_capacity_wait_s.", labels, registry=r)
        self.batch_size = Histogram("kubeinfer:router_batch_size", "Requests per replica call.", labels,
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        r.register(_ReplicaCollector(reports))

    def record_finished(self, model: str, last: Chunk, *, e2e_s: float, router_wait_s: float,
                        max_tokens: int | None) -> None:
        """One request ended with ``last`` (its finished chunk): every per-request metric at once.
        ``router_wait_s`` is its time in the router's admission queue (added to the engine's queue)."""
        self.e2e.labels(model).observe(e2e_s)
        self.request_success.labels(model, last.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(last.prompt_tokens)
        self.generation_tokens.labels(model).inc(last.completion_tokens)
        self.prompt_tokens_cached.labels(model).inc(last.cached_tokens)
        self.request_prompt_tokens.labels(model).observe(last.prompt_tokens)
        self.request_generation_tokens.labels(model).observe(last.completion_tokens)
        self.request_prefill_computed.labels(model).observe(last.prompt_tokens - last.cached_tokens)
        if max_tokens is not None:
            self.request_max_tokens.labels(model).observe(max_tokens)
        t = last.timings or {}
        self.queue_time.labels(model).observe(router_wait_s + t.get("queue", 0.0))
        for name, histogram in (("prefill", self.prefill_time), ("decode", self.decode_time),
                                ("inference", self.inference_time)):
            if name in t:
                histogram.labels(model).observe(t[name])
        if "decode" in t and last.completion_tokens > 1:
            self.tpot.labels(model).observe(t["decode"] / (last.completion_tokens - 1))

    def record_abandoned(self, model: str) -> None:
        """A request whose client went away before it finished (vLLM counts it as an abort)."""
        self.request_success.labels(model, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


SPEC_DECODE_WIDTH = 3 + MAX_SPECULATIVE_TOKENS  # SpeculativeStats.counts()


def _counters(r: ReplicaReport) -> list[int]:
    """A report's counters as one vector: preemptions, prefix hits, prefix queries, iteration-token
    sum, the iteration-token bucket counts, then speculative decoding's (SpeculativeStats.counts())."""
    buckets = list(r.iteration_tokens) or [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    spec = list(r.spec_decode) or [0] * SPEC_DECODE_WIDTH
    return [r.num_preemptions, r.prefix_cache_hits, r.prefix_cache_queries, r.iteration_tokens_sum, *buckets, *spec]


def _add(a: list[int] | None, b: list[int]) -> list[int]:
    return list(b) if a is None else [x + y for x, y in zip(a, b)]


class _ReplicaCollector:
    """Turns the replicas' reports into vLLM's engine metrics at scrape time.

    Gauges sum the replicas heard from recently. Counters never go down: they sum the latest report
    of every replica ever heard from (one that stopped reporting keeps its last totals), and when a
    replica's counters go back (it restarted under the same id) its earlier totals are kept too.
    """

    def __init__(self, reports) -> None:
        self._reports = reports
        self._latest: dict[tuple[str, str], list[int]] = {}   # (model, replica_id) -> its counters
        self._earlier: dict[str, list[int]] = {}              # model -> totals of replicas' earlier lives

    def _counter_totals(self, model: str, reports: list[ReplicaReport]) -> list[int]:
        for r in reports:
            now, before = _counters(r), self._latest.get((model, r.replica_id))
            if before is not None and any(x < y for x, y in zip(now, before)):
                self._earlier[model] = _add(self._earlier.get(model), before)
            self._latest[model, r.replica_id] = now
        total = self._earlier.get(model)
        for (m, _), counters in self._latest.items():
            if m == model:
                total = _add(total, counters)
        return total or _counters(ReplicaReport(""))

    def collect(self) -> Iterable:
        labels = ["model_name"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engines' running batch.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting in the engines.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full (mean over replicas).",
                               labels=labels)
        replicas = GaugeMetricFamily("kubeinfer:replicas_reporting", "Replicas heard from in the last minute.",
                                     labels=labels)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                   labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels=labels)
        iteration = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens per engine step.", labels=labels)
        drafts = CounterMetricFamily("vllm:spec_decode_num_drafts", "Speculative proposals verified.", labels=labels)
        draft_tokens = CounterMetricFamily("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                           labels=labels)
        accepted = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                       labels=labels)
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the proposal.",
                                      labels=[*labels, "position"])
        for model, reports in self._reports().items():
            reports: list[ReplicaReport]
            running.add_metric([model], sum(r.num_requests_running for r in reports))
            waiting.add_metric([model], sum(r.num_requests_waiting for r in reports))
            kv.add_metric([model], sum(r.kv_cache_usage for r in reports) / max(len(reports), 1))
            replicas.add_metric([model], len(reports))
            n_preempt, n_hits, n_queries, iteration_sum, *counts = self._counter_totals(model, reports)
            counts, spec = counts[:-SPEC_DECODE_WIDTH], counts[-SPEC_DECODE_WIDTH:]
            if spec[0]:  # a model whose replicas speculate (vLLM shows these only then too)
                drafts.add_metric([model], spec[0])
                draft_tokens.add_metric([model], spec[1])
                accepted.add_metric([model], spec[2])
                positions = spec[3:]
                while len(positions) > 1 and not positions[-1]:  # up to the last position ever accepted
                    positions = positions[:-1]
                for position, count in enumerate(positions):
                    per_pos.add_metric([model, str(position)], count)
            preempt.add_metric([model], n_preempt)
            hits.add_metric([model], n_hits)
            queries.add_metric([model], n_queries)
            cumulative, buckets = 0, []
            for bound, count in zip((*ITERATION_TOKENS_BUCKETS, "+Inf"), counts):
                cumulative += count
                buckets.append((str(bound), cumulative))
            iteration.add_metric([model], buckets, iteration_sum)
        return [running, waiting, kv, replicas, preempt, hits, queries, iteration, drafts, draft_tokens, accepted,
                per_pos]
