"""Serving benchmark on the default model (int4), all in one process (no Ray), in one run:

    python benchmarks/serving.py                     # the full run (`make bench`)
    python benchmarks/serving.py --quick             # a smoke run: few requests, figures not meaningful
    python benchmarks/serving.py --sections overhead,affinity,batching

overhead  the router's added latency: the same sequential requests straight into an AsyncEngine and
          through the gRPC server + router (one replica over the same engine); TTFT and end-to-end
          p50/p99 for both, and the difference of the p50s (target <= 2 ms).
affinity  prefix-affinity vs power-of-two-choices TTFT on two replicas, with the shared-system-prompt
          workload at a moderate Poisson rate (open loop); the replicas' prefix-cache hit counters.
          Each replica's KV pool holds about half the system prompts, as a busy fleet's would: with
          affinity each replica keeps its half cached, while power-of-two spreads every prompt to both
          replicas, which evict each other's prefixes.
batching  micro-batching on (window 5 ms, up to 8) vs off, one replica, at a high request rate
          (200 req/s: several arrivals fall in one window, so calls carry several requests).

Every request is greedy with ignore_eos, so each produces exactly its max_tokens. Client-side
timestamps throughout (`kubeinfer.bench`); the client runs on the server's event loop, so the gRPC
figures include the client's own work too. The engines are loaded once and reused by every section
(each section wraps them in fresh AsyncEngines, pools and routers); the two engines of the affinity
section run one torch thread each, so two replicas share the machine's two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import torch

from kubeinfer.bench.loadgen import LoadSpec, run_load, send_one
from kubeinfer.bench.report import RequestRecord, format_report, summarize
from kubeinfer.bench.workloads import SIMPLE_PROMPTS, SharedPrefixWorkload, SimpleWorkload, WorkItem
from kubeinfer.client import AsyncClient
from kubeinfer.router.grpc_service import start_grpc_server
from kubeinfer.router.policies import make_policy
from kubeinfer.local.pool import LocalPool
from kubeinfer.local.replica import EngineReplica
from kubeinfer.router.router import Router
from kubeinfer.router.served_model import ServedModel
from kubeinfer.router.settings import RouterSettings
from kubeinfer.worker import Engine, EngineConfig, SamplingParams
from kubeinfer.worker.async_engine import AsyncEngine

MODEL_URI = "builtin://smollm2-135m"
MODEL_NAME = "smollm2-135m"
QUANTIZATION = "int4"
MAX_MODEL_LEN = 1024
# A system prompt of the affinity workload (250 words) is ~17 KV blocks of 16 tokens; 192 blocks per
# replica hold about 10 of the 16 (with the requests in flight), so a replica that sees half of them
# can keep its half cached and one that sees all of them cannot.
NUM_KV_BLOCKS = 192


@dataclass(frozen=True)
class Scale:
    """The sizes of one run (full or quick)."""

    overhead_requests: int
    overhead_tokens: int
    affinity_prefixes: int
    affinity_prefix_words: int
    affinity_requests: int
    affinity_rate: float
    affinity_tokens: int
    batching_requests: int
    batching_rate: float
    batching_tokens: int


FULL = Scale(overhead_requests=30, overhead_tokens=16, affinity_prefixes=16, affinity_prefix_words=250,
             affinity_requests=48, affinity_rate=0.5, affinity_tokens=16, batching_requests=64,
             batching_rate=200.0, batching_tokens=32)
QUICK = Scale(overhead_requests=5, overhead_tokens=8, affinity_prefixes=4, affinity_prefix_words=250,
              affinity_requests=8, affinity_rate=2.0, affinity_tokens=4, batching_requests=8,
              batching_rate=200.0, batching_tokens=8)
WARMUP_REQUESTS = 2


def load_engines(n: int) -> list[Engine]:
    config = dict(model=MODEL_URI, quantization=QUANTIZATION, max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_KV_BLOCKS)
    return [Engine(EngineConfig(**config)) for _ in range(n)]


@asynccontextmanager
async def serving(engines: list[Engine], settings: RouterSettings) -> AsyncIterator[tuple[Router, AsyncClient]]:
    """A router over fresh AsyncEngines of ``engines``, served by gRPC on loopback, and a client to it.

    The same assembly as ``kubeinfer.local.router.build_served_model``, over engines already loaded.
    """
    replicas = [EngineReplica(AsyncEngine(e), f"{MODEL_NAME}-{i}") for i, e in enumerate(engines)]
    first = engines[0]
    served = ServedModel(MODEL_NAME, first.tokenizer, first.max_model_len, first.model_config.vocab_size,
                         LocalPool(replicas, make_policy(settings.policy)), uri=MODEL_URI, quantization=QUANTIZATION)
    router = Router([served], settings)
    server, port = await start_grpc_server(router, "127.0.0.1:0")
    client = AsyncClient(f"127.0.0.1:{port}")
    try:
        yield router, client
    finally:
        await client.close()
        await server.stop(0)
        await router.aclose()
        served.pool.shutdown()  # stops the AsyncEngines' threads; the Engines stay loaded


def greedy_spec(max_tokens: int, num_requests: int, rate: float = math.inf) -> LoadSpec:
    return LoadSpec(rate=rate, num_requests=num_requests, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def prefix_cache_counters(engines: list[Engine]) -> list[tuple[int, int]]:
    return [(s.prefix_cache_queries, s.prefix_cache_hits) for s in (e.stats() for e in engines)]


# ---- a. the router's added latency ----------------------------------------------------------------


async def engine_request(engine: AsyncEngine, prompt: str, params: SamplingParams, t0: float) -> RequestRecord:
    """One request straight into the engine, timed as :func:`kubeinfer.bench.loadgen.send_one` times one."""
    start = time.perf_counter()
    record = RequestRecord(start_s=start - t0, end_s=start - t0)
    last = None
    async for out in engine.generate(prompt, params):
        now = time.perf_counter()
        n = len(out.new_token_ids)
        if n:
            record.add_tokens(n, now - start, None if last is None else now - last)
            last = now
        if out.finished:
            record.prompt_tokens, record.cached_prompt_tokens = out.num_prompt_tokens, out.num_cached_tokens
            if out.error:
                record.code, record.error = "ENGINE_ERROR", out.error
    record.end_s = time.perf_counter() - t0
    return record


def overhead_prompts(n: int) -> list[str]:
    # Shorter than one KV block: no prefix-cache hit between the two paths, which send the same prompts.
    return [SIMPLE_PROMPTS[i % len(SIMPLE_PROMPTS)] for i in range(n)]


async def bench_overhead(engine: Engine, scale: Scale) -> dict[str, Any]:
    prompts = overhead_prompts(scale.overhead_requests)
    params = SamplingParams(max_tokens=scale.overhead_tokens, temperature=0.0, ignore_eos=True)
    direct = AsyncEngine(engine)
    try:
        for p in prompts[:WARMUP_REQUESTS]:
            await engine_request(direct, p, params, time.perf_counter())
        t0 = time.perf_counter()
        direct_records = [await engine_request(direct, p, params, t0) for p in prompts]
    finally:
        direct.shutdown()
    spec = greedy_spec(scale.overhead_tokens, len(prompts))
    async with serving([engine], RouterSettings(policy="round_robin")) as (_, client):
        for p in prompts[:WARMUP_REQUESTS]:
            await send_one(client, WorkItem(p), spec, time.perf_counter())
        t0 = time.perf_counter()
        routed_records = [await send_one(client, WorkItem(p), spec, t0) for p in prompts]
    direct_s, routed_s = summarize(direct_records), summarize(routed_records)
    return {"engine": direct_s, "router": routed_s,
            "added_ttft_p50_ms": routed_s["ttft_ms"]["p50"] - direct_s["ttft_ms"]["p50"],
            "added_e2e_p50_ms": routed_s["e2e_ms"]["p50"] - direct_s["e2e_ms"]["p50"]}


# ---- b. prefix affinity vs power of two -----------------------------------------------------------


async def warm_up_long_prompts(engines: list[Engine], scale: Scale) -> None:
    """Two long-prompt requests per engine, round robin, before anything is timed: an engine's first
    long prefills (at a new thread count) pay one-off costs that would otherwise all land on
    whichever policy runs first. Their system prompts are disjoint from both timed runs'."""
    workload = SharedPrefixWorkload(2 * len(engines), scale.affinity_prefix_words,
                                    first_prefix=2 * scale.affinity_prefixes)
    spec = greedy_spec(scale.affinity_tokens, 1)
    async with serving(engines, RouterSettings(policy="round_robin")) as (_, client):
        for _ in range(2 * len(engines)):
            await send_one(client, workload.next(), spec, time.perf_counter())


async def bench_affinity(engines: list[Engine], scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine threads started below take this on their first op
    try:
        await warm_up_long_prompts(engines, scale)
        for i, policy in enumerate(("prefix_affinity", "power_of_two")):
            # Disjoint system prompts per policy: the second run cannot hit prefixes the first one cached.
            workload = SharedPrefixWorkload(scale.affinity_prefixes, scale.affinity_prefix_words, seed=0,
                                            first_prefix=i * scale.affinity_prefixes)
            spec = greedy_spec(scale.affinity_tokens, scale.affinity_requests, scale.affinity_rate)
            before = prefix_cache_counters(engines)
            async with serving(engines, RouterSettings(policy=policy)) as (_, client):
                records = await run_load(client, workload, spec)
            after = prefix_cache_counters(engines)
            summary = summarize(records)
            summary["replica_prefix_cache"] = [{"queries": qa - qb, "hits": ha - hb}
                                               for (qb, hb), (qa, ha) in zip(before, after)]
            results[policy] = summary
    finally:
        torch.set_num_threads(threads)
    a, p = results["prefix_affinity"]["ttft_ms"], results["power_of_two"]["ttft_ms"]
    results["ttft_p50_ratio"] = p["p50"] / a["p50"] if a["p50"] else None
    results["ttft_p99_ratio"] = p["p99"] / a["p99"] if a["p99"] else None
    return results


# ---- c. micro-batching on vs off ------------------------------------------------------------------


async def bench_batching(engine: Engine, scale: Scale) -> dict[str, Any]:
    results: dict[str, Any] = {}
    settings = {"off": RouterSettings(batch_window_ms=0),
                "on": RouterSettings(batch_window_ms=5, max_batch_size=8)}
    spec = greedy_spec(scale.batching_tokens, scale.batching_requests, scale.batching_rate)
    for name, s in settings.items():
        async with serving([engine], s) as (router, client):
            records = await run_load(client, SimpleWorkload(), spec)
            calls = _sample(router, "kubeinfer:router_batch_size_count")
            jobs = _sample(router, "kubeinfer:router_batch_size_sum")
        results[name] = summarize(records)
        results[name]["mean_batch_size"] = jobs / calls if calls else None
    on, off = results["on"], results["off"]
    base = off["output_throughput"]
    results["throughput_ratio"] = on["output_throughput"] / base if base else None
    return results


def _sample(router: Router, name: str) -> float:
    return router.metrics.registry.get_sample_value(name, {"model_name": MODEL_NAME}) or 0.0


# ---- printing -------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def latency_table(rows: dict[str, dict[str, Any]], baseline: str) -> str:
    """One line per configuration: TTFT / end-to-end p50 and p99, throughput, and ratios to ``baseline``."""
    base = rows[baseline]
    lines = [f"{'':<16}{'TTFT p50':>10}{'TTFT p99':>10}{'E2E p50':>10}{'E2E p99':>10}{'ITL p50':>9}"
             f"{'req/s':>8}{'tok/s':>8}{'ok/all':>8}   TTFT p50 vs {baseline}"]
    for name, s in rows.items():
        lines.append(f"{name:<16}{_f(s['ttft_ms']['p50']):>10}{_f(s['ttft_ms']['p99']):>10}"
                     f"{_f(s['e2e_ms']['p50']):>10}{_f(s['e2e_ms']['p99']):>10}{_f(s['itl_ms']['p50']):>9}"
                     f"{s['request_throughput']:>8.2f}{s['output_throughput']:>8.1f}"
                     f"{s['completed']:>4}/{s['requests']:<3}   {_ratio(s['ttft_ms']['p50'], base['ttft_ms']['p50'])}")
    return "\n".join(lines)


def print_overhead(r: dict[str, Any], scale: Scale) -> None:
    print(f"\n## a. Router overhead ({scale.overhead_requests} sequential requests, {scale.overhead_tokens} "
          f"tokens each, greedy; latencies in ms)")
    print(latency_table({"engine direct": r["engine"], "gRPC + router": r["router"]}, "engine direct"))
    added = r["added_ttft_p50_ms"]
    print(f"router added latency (p50 difference): TTFT {added:+.2f} ms, end-to-end {r['added_e2e_p50_ms']:+.2f} ms"
          f"  (target <= 2 ms p50: {'met' if added <= 2.0 else 'missed'})")


def print_affinity(r: dict[str, Any], scale: Scale) -> None:
    print(f"\n## b. Prefix affinity vs power of two (2 replicas, 1 thread each; {scale.affinity_requests} requests "
          f"at {scale.affinity_rate:g} req/s Poisson, {scale.affinity_prefixes} system prompts of "
          f"~{scale.affinity_prefix_words} words, {scale.affinity_tokens} tokens each)")
    rows = {"prefix_affinity": r["prefix_affinity"], "power_of_two": r["power_of_two"]}
    print(latency_table(rows, "prefix_affinity"))
    for name, s in rows.items():
        caches = ", ".join(f"replica {i}: {c['hits']}/{c['queries']} blocks"
                           for i, c in enumerate(s["replica_prefix_cache"]))
        share = s["cached_prompt_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        print(f"{name}: prompt tokens from the prefix cache {s['cached_prompt_tokens']}/{s['prompt_tokens']} "
              f"({share:.0%}); engine prefix-cache hits {caches}")
    better = r["ttft_p50_ratio"] is not None and r["ttft_p50_ratio"] > 1
    print(f"power_of_two / prefix_affinity TTFT: p50 {_f(r['ttft_p50_ratio'], 2)}x, p99 {_f(r['ttft_p99_ratio'], 2)}x"
          f"  (target: affinity better: {'met' if better else 'missed'})")


def print_batching(r: dict[str, Any], scale: Scale) -> None:
    print(f"\n## c. Micro-batching (1 replica; {scale.batching_requests} requests at {scale.batching_rate:g} req/s "
          f"Poisson, {scale.batching_tokens} tokens each)")
    print(latency_table({"batching off": r["off"], "batching on": r["on"]}, "batching off"))
    print(f"mean batch size: off {_f(r['off']['mean_batch_size'], 2)}, on {_f(r['on']['mean_batch_size'], 2)}; "
          f"output throughput on / off: {_f(r['throughput_ratio'], 2)}x")


async def run(sections: set[str], scale: Scale) -> dict[str, Any]:
    t = time.perf_counter()
    engines = load_engines(2 if "affinity" in sections else 1)
    print(f"loaded {len(engines)} engine(s) in {time.perf_counter() - t:.1f} s", flush=True)
    results: dict[str, Any] = {}
    if "overhead" in sections:
        results["overhead"] = await bench_overhead(engines[0], scale)
        print_overhead(results["overhead"], scale)
    if "affinity" in sections:
        results["affinity"] = await bench_affinity(engines[:2], scale)
        print_affinity(results["affinity"], scale)
    if "batching" in sections:
        results["batching"] = await bench_batching(engines[0], scale)
        print_batching(results["batching"], scale)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few requests per section: a smoke run")
    ap.add_argument("--sections", default="overhead,affinity,batching")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every summary as JSON")
    ap.add_argument("--verbose", action="store_true", help="also print each run's full load-test report")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"overhead", "affinity", "batching"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    scale = QUICK if args.quick else FULL
    print(f"# kubeinfer serving benchmark{' (quick: figures not meaningful)' if args.quick else ''}")
    print(f"model {MODEL_URI} ({QUANTIZATION}, max_model_len {MAX_MODEL_LEN}, {NUM_KV_BLOCKS} KV blocks/replica); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    t = time.perf_counter()
    results = asyncio.run(run(sections, scale))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    if args.verbose:
        for section, r in results.items():
            for name, s in r.items():
                if isinstance(s, dict) and "ttft_ms" in s:
                    print("\n" + format_report(s, f"{section}: {name}"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
