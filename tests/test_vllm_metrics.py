"""The router exports the vLLM metrics that benchmark tools scrape, with vLLM's meanings (issue 18).

inference-perf's vLLM client (inference_perf/client/modelserver/vllm_client.py) scrapes the names
below and silently reports zeros for any that is missing. Each is checked present after real
traffic through a real router and engine, and the ones with a meaning we can check are checked for it.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.router.metrics import RouterMetrics
from kubeinfer.router.parallel import expand, stream_choices
from kubeinfer.router.types import ReplicaReport
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.outputs import ITERATION_TOKENS_BUCKETS

# What inference-perf's vLLM client scrapes (family names, as a Prometheus parser reports them:
# counters without their ``_total`` suffix).
INFERENCE_PERF_SCRAPES = {
    "counter": ["vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
                "vllm:prefix_cache_hits", "vllm:prefix_cache_queries", "vllm:prompt_tokens_cached"],
    "gauge": ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"],
    "histogram": ["vllm:e2e_request_latency_seconds", "vllm:request_time_per_output_token_seconds",
                  "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                  "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
                  "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                  "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_params_max_tokens",
                  "vllm:iteration_tokens_total", "vllm:request_prefill_kv_computed_tokens", "vllm:request_params_n"],
}
# Scraped by inference-perf but not exported, because kubeinfer has no such thing to count (an
# exported zero would claim a measurement): no external KV
# cache, multimodal cache or KV-block lifetime tracking; preempted requests are recomputed but the
# engine does not yet count the recomputed prompt tokens apart; no corrupted-request detection.
NOT_EXPORTED = ["vllm:request_max_num_generation_tokens", "vllm:prompt_tokens_recomputed",
                "vllm:external_prefix_cache_hits", "vllm:external_prefix_cache_queries", "vllm:mm_cache_hits",
                "vllm:mm_cache_queries", "vllm:corrupted_requests", "vllm:kv_block_idle_before_evict_seconds",
                "vllm:kv_block_lifetime_seconds", "vllm:kv_block_reuse_gap_seconds"]


def families(metrics: RouterMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def value(family, suffix: str = "", **labels) -> float:
    """The sum of a family's samples named ``family.name + suffix`` whose labels include ``labels``."""
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def scraped(tiny_llama_dir):
    """Six requests through a real router (two share a 64-token prefix), the scrape after them, and
    the engine's own stats."""
    spec = ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=512,
                     engine={"num_kv_blocks": 128, "max_num_seqs": 4}, num_replicas=1)
    router = build_local_router(AppConfig(models=[spec], router=RouterSettings(max_in_flight=8)))
    prefix = list(range(3, 67))

    async def one(tokens: list[int], max_tokens: int) -> None:
        job = router.prepare(prompt_token_ids=tokens, sampling=dict(temperature=0.0, max_tokens=max_tokens,
                                                                    ignore_eos=True))
        async for _ in stream_choices(router, expand(job, 1)):  # the transports' path
            pass

    async def main():
        await one(prefix + [70, 71], 5)  # fills the prefix cache for the next one
        await one(prefix + [80, 81, 82], 6)
        await asyncio.gather(*(one([90 + i] * (10 + i), 4 + i) for i in range(4)))

    try:
        asyncio.run(main())
        engine = next(iter(router.models["tiny"].pool.replicas.values())).engine.engine
        return families(router.metrics), engine.stats()
    finally:
        shutdown_local_router(router)


def test_every_name_inference_perf_scrapes_is_exported_with_its_type(scraped):
    fams, _ = scraped
    for kind, names in INFERENCE_PERF_SCRAPES.items():
        for name in names:
            assert name in fams, f"{name} is not exported"
            assert fams[name].type == kind, (name, fams[name].type)
            assert any(s.labels.get("model_name") == "tiny" for s in fams[name].samples), name
    assert not set(NOT_EXPORTED) & set(fams)


def test_request_metrics_count_each_finished_request_once_with_vllm_meanings(scraped):
    fams, stats = scraped
    n = 6
    assert value(fams["vllm:request_success"], "_total", finished_reason="length") == n
    generated = 5 + 6 + sum(4 + i for i in range(4))
    prompts = 66 + 67 + sum(10 + i for i in range(4))
    assert value(fams["vllm:generation_tokens"], "_total") == generated == stats.generation_tokens
    assert value(fams["vllm:prompt_tokens"], "_total") == prompts == stats.prompt_tokens
    assert value(fams["vllm:request_generation_tokens"], "_sum") == generated
    assert value(fams["vllm:request_prompt_tokens"], "_sum") == prompts
    assert value(fams["vllm:request_params_max_tokens"], "_sum") == generated  # ignore_eos: all ran to max
    # The second request found the first one's 4 full blocks of 16 in the prefix cache.
    assert value(fams["vllm:prompt_tokens_cached"], "_total") == 64 == stats.prefix_cache_hits
    assert value(fams["vllm:request_prefill_kv_computed_tokens"], "_sum") == prompts - 64
    for name in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                 "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:request_time_per_output_token_seconds",
                 "vllm:time_to_first_token_seconds"):
        assert value(fams[name], "_count") == n, name
        assert value(fams[name], "_sum") > 0, name
    # The engine's phases partition its time: inference = prefill + decode, within e2e.
    prefill, decode, inference = (value(fams[f"vllm:request_{p}_time_seconds"], "_sum")
                                  for p in ("prefill", "decode", "inference"))
    assert math.isclose(prefill + decode, inference, rel_tol=1e-6)
    assert inference < value(fams["vllm:e2e_request_latency_seconds"], "_sum")


def test_iteration_tokens_histogram_is_the_engines_steps(scraped):
    fams, stats = scraped
    family = fams["vllm:iteration_tokens_total"]
    assert value(family, "_count") == stats.num_steps > 0
    assert value(family, "_sum") == stats.computed_tokens
    buckets = [s for s in family.samples if s.name.endswith("_bucket")]
    assert [s.labels["le"] for s in buckets][-1] == "+Inf" and len(buckets) == len(ITERATION_TOKENS_BUCKETS) + 1
    cumulative = [sum(stats.iteration_tokens.counts[:i + 1]) for i in range(len(buckets))]
    assert [s.value for s in buckets] == cumulative
    assert buckets[0].value > 0  # the two sequential requests decode one token per step


def test_request_latency_buckets_reach_past_30_minutes(scraped):
    fams, _ = scraped
    for name in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds"):
        bounds = [float(s.labels["le"]) for s in fams[name].samples
                  if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"]
        assert max(bounds) >= 1800, name


def test_counters_never_go_down_when_replicas_leave_or_restart():
    reports: dict[str, list[ReplicaReport]] = {"m": [ReplicaReport("a", num_preemptions=3, prefix_cache_hits=10),
                                                     ReplicaReport("b", num_preemptions=1)]}
    metrics = RouterMetrics(lambda: reports)

    def counters() -> tuple[float, float, float]:
        fams = families(metrics)
        return (value(fams["vllm:num_preemptions"], "_total"), value(fams["vllm:prefix_cache_hits"], "_total"),
                value(fams["vllm:num_requests_running"]))

    assert counters() == (4, 10, 0)
    reports["m"] = [ReplicaReport("a", num_preemptions=5, prefix_cache_hits=12, num_requests_running=2)]
    assert counters() == (6, 12, 2)  # b stopped reporting: its 1 preemption stays counted, not its gauges
    reports["m"] = [ReplicaReport("a", num_preemptions=1, prefix_cache_hits=0)]  # a restarted
    assert counters() == (7, 12, 0)


def test_a_waiting_request_is_one_prefix_cache_query_in_tokens(tiny_llama_dir):
    """A request that waits for blocks is looked up every step; it is counted once, when admitted."""
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=16, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[5 + i] * 180 for i in range(2)]  # 12 blocks each at the end: the second must wait
    outs = engine.generate(prompts, params)
    stats = engine.stats()
    assert all(o.num_output_tokens == 40 for o in outs)
    assert stats.prefix_cache_queries == 360 and stats.prefix_cache_hits == 0


def test_speculative_decoding_counters_are_the_engines(tiny_llama_dir):
    """vLLM's spec-decode counters through a real router over a speculating engine."""
    spec = ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256, num_replicas=1,
                     engine={"num_kv_blocks": 64, "speculative_method": "ngram", "prompt_lookup_min": 1})
    router = build_local_router(AppConfig(models=[spec]))

    async def main():
        for tokens in ([5, 6, 7] * 8, list(range(10, 30)) * 2):
            job = router.prepare(prompt_token_ids=tokens, sampling=dict(temperature=0.0, max_tokens=24,
                                                                        ignore_eos=True))
            async for _ in router.stream(job):
                pass

    try:
        asyncio.run(main())
        engine = next(iter(router.models["tiny"].pool.replicas.values())).engine.engine
        stats = engine.stats().speculative
        fams = families(router.metrics)
    finally:
        shutdown_local_router(router)
    assert stats.num_drafts > 0
    assert value(fams["vllm:spec_decode_num_drafts"], "_total") == stats.num_drafts
    assert value(fams["vllm:spec_decode_num_draft_tokens"], "_total") == stats.num_draft_tokens
    assert value(fams["vllm:spec_decode_num_accepted_tokens"], "_total") == stats.num_accepted_tokens
    per_pos = fams["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert value(per_pos, "_total") == stats.num_accepted_tokens
    assert value(per_pos, "_total", position="0") == stats.accepted_per_pos[0]


def test_request_params_n_counts_each_request_once_with_its_n(tiny_llama_dir):
    spec = ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=1)
    router = build_local_router(AppConfig(models=[spec]))

    async def main():
        for n in (1, 3):
            job = router.prepare(prompt_token_ids=[5, 6, 7], sampling=dict(max_tokens=3, seed=1))
            async for _ in stream_choices(router, expand(job, n)):
                pass

    try:
        asyncio.run(main())
        fam = families(router.metrics)["vllm:request_params_n"]
    finally:
        shutdown_local_router(router)
    assert value(fam, "_count") == 2 and value(fam, "_sum") == 4
