"""The autoscaling policies on this machine's local Ray (issue 15), beside what the simulator
(benchmarks/autoscaling.py) predicts for the very same run: how closely the simulator tracks a real one.

The run: 1-2 replicas of the default model (1 CPU each); Poisson arrivals at LOW_RPS, HIGH_RPS for the
middle third, then LOW_RPS again; prompts of PROMPT_WORDS words, OUTPUT_TOKENS tokens out; scaling
delays of 5 s up and 15 s down, metrics pushed every second and averaged over 5 s. Replica-seconds come
from Serve's status, polled each second.

The twin: the simulator replays the same arrival times with a replica model calibrated here first, from
an engine configured as one replica (its thread count, batch and KV pool): the step time at batch 1 and
at a full batch, and a full prefill chunk. A replica's start time is the one the real runs measured
(seconds in STARTING per start). The simulated rows are the mean and range over SIM_SEEDS routing seeds.

    python benchmarks/autoscaling_real.py [--policies ongoingRequests latency] [--seconds 180] [--seed 0] [--slo 2]
    python benchmarks/autoscaling_real.py --simulate-only --high-rps 16 --slo 0.25   # the twin alone, no Ray
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from autoscaling import SLO_TTFT_S, Pipeline, ReplicaModel, Req, simulate  # noqa: E402

from kubeinfer.serve.autoscaling import PolicySettings, ray_policy  # noqa: E402

LOW_RPS, HIGH_RPS = 0.5, 4.0
PROMPT_WORDS, OUTPUT_TOKENS = 40, 32
WORDS = "the quick brown fox jumps over a lazy dog while kubernetes schedules pods on nodes".split()
REPLICA_ENGINE = {"max_num_seqs": 16}
REPLICA_THREADS = 1
SCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "upscale_delay_s": 5.0,
           "downscale_delay_s": 15.0, "metrics_interval_s": 1.0, "look_back_period_s": 5.0}
PIPELINE = Pipeline(push_s=SCALING["metrics_interval_s"], look_back_s=SCALING["look_back_period_s"], tick_s=0.5)
SIM_SEEDS = 5


def arrivals(seconds: float, seed: int, high_rps: float = HIGH_RPS) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(high_rps if seconds / 3 <= t < 2 * seconds / 3 else LOW_RPS)
        if t >= seconds:
            return out
        out.append(t)


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(PROMPT_WORDS))


def calibrate() -> tuple[ReplicaModel, int]:
    """A ReplicaModel measured on an engine configured as one replica, and the prompt's token count."""
    from kubeinfer.worker import Engine, SamplingParams
    engine = Engine(num_threads=REPLICA_THREADS, **REPLICA_ENGINE)
    prompt_tokens = len(engine.tokenizer.encode(prompt(random.Random(0))))
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    def decode_step_s(batch: int) -> float:
        for i in range(batch):
            engine.add_request(f"c{batch}-{i}", prompt_token_ids=list(range(100, 100 + prompt_tokens)), params=params)
        times = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)  # decode steps: the few prefill steps come first and are outliers

    decode_step_s(1)  # warm-up
    base, full = decode_step_s(1), decode_step_s(REPLICA_ENGINE["max_num_seqs"])
    chunk = engine.config.max_num_batched_tokens
    engine.add_request("prefill", prompt_token_ids=[100 + i % 1000 for i in range(chunk)],
                       params=SamplingParams(max_tokens=1))
    t0 = time.perf_counter()
    engine.step()
    prefill = time.perf_counter() - t0
    return ReplicaModel(step_base_s=base, step_per_seq_s=(full - base) / (REPLICA_ENGINE["max_num_seqs"] - 1),
                        step_per_prefill_token_s=max(0.0, prefill - base) / chunk,
                        max_num_seqs=REPLICA_ENGINE["max_num_seqs"], step_tokens=chunk,
                        kv_tokens=engine.num_kv_blocks * engine.kv.block_size), prompt_tokens


def real_run(policy: str, seconds: float, seed: int, slo_s: float, high_rps: float,
             ttft_s: float | None = None) -> dict[str, float]:
    """One policy on local Ray (Serve must be running): attainment, p99 TTFT, replica-seconds, errors,
    and the seconds its replicas spent starting, per start."""
    from ray import serve

    from kubeinfer.client import AsyncClient
    from kubeinfer.serve.app import build_app
    from kubeinfer.serve.config import AppConfig, ModelSpec
    auto = dict(SCALING)
    if policy == "ongoingRequests":
        auto["target_ongoing_requests"] = 2.0
    else:
        auto["policy"] = ray_policy(PolicySettings(policy=policy, ttft_seconds=ttft_s or slo_s))
    app = AppConfig(models=[ModelSpec(name="m", uri="builtin://smollm2-135m", engine=dict(REPLICA_ENGINE),
                                      ray_actor_options={"num_cpus": REPLICA_THREADS}, autoscaling=auto)])
    serve.run(build_app(app.to_dict()), name="auto", route_prefix="/")
    rng = random.Random(seed)
    ttfts: list[float] = []
    errors, replica_s, starting_s, starts, was_starting = 0, 0.0, 0.0, 0, 0

    async def one(client: AsyncClient, at: float) -> None:
        nonlocal errors
        await asyncio.sleep(at)
        text, start = prompt(rng), time.monotonic()
        try:
            async for _ in client.stream(text, max_tokens=OUTPUT_TOKENS, timeout=120):
                ttfts.append(time.monotonic() - start)
                break
        except Exception:
            errors += 1

    async def load() -> None:
        nonlocal replica_s, starting_s, starts, was_starting
        async with AsyncClient("127.0.0.1:9123", application="auto") as client:
            done = asyncio.gather(*(one(client, at) for at in arrivals(seconds, seed, high_rps)))
            while not done.done():
                states = serve.status().applications["auto"].deployments["worker-m"].replica_states
                replica_s += sum(states.get(k, 0) for k in ("RUNNING", "STARTING", "STOPPING"))
                starting = states.get("STARTING", 0)
                starting_s += starting
                starts += max(0, starting - was_starting)
                was_starting = starting
                await asyncio.sleep(1.0)
            await done
    asyncio.run(load())
    serve.delete("auto")
    ttfts.sort()
    n = len(ttfts) + errors
    return {"requests": n, "attainment": sum(x <= slo_s for x in ttfts) / max(1, n),
            "p99": ttfts[int(0.99 * (len(ttfts) - 1))] if ttfts else float("nan"), "replica_s": replica_s,
            "errors": errors, "start_s": starting_s / starts if starts else float("nan")}


def twin(policy: str, seconds: float, seed: int, slo_s: float, high_rps: float, model: ReplicaModel,
         prompt_tokens: int, ttft_s: float | None = None) -> list[dict]:
    """The simulator's prediction of ``real_run(policy, seconds, seed, slo_s, high_rps)``, one per routing
    seed."""
    auto = dict(SCALING)
    targets = {"ttft_seconds": ttft_s or slo_s} if policy != "ongoingRequests" else {}
    if policy == "ongoingRequests":
        auto["target_ongoing_requests"] = 2.0
    times = arrivals(seconds, seed, high_rps)
    return [simulate([Req(t, prompt_tokens, OUTPUT_TOKENS) for t in times], policy, seconds, s, targets, model,
                     PIPELINE, slo_s=slo_s, **auto) for s in range(SIM_SEEDS)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policies", nargs="+", default=["ongoingRequests", "latency"])
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", type=float, default=SLO_TTFT_S,
                   help="the TTFT SLO in seconds (attainment, and `latency`'s ttftSeconds unless --ttft-seconds)")
    p.add_argument("--ttft-seconds", type=float, default=None, help="`latency`'s ttftSeconds (default: --slo)")
    p.add_argument("--high-rps", type=float, default=HIGH_RPS, help="the arrival rate of the middle third")
    p.add_argument("--max-replicas", type=int, default=SCALING["max_replicas"],
                   help="the deployment's replica cap (this 2-core machine holds 2 real replicas of 1 CPU)")
    p.add_argument("--simulate-only", action="store_true",
                   help="calibrate, then print the simulator's rows only (no Ray; replica start: --start-s)")
    p.add_argument("--start-s", type=float, default=15.0,
                   help="with --simulate-only: a replica's start (the real runs measured 15 s)")
    args = p.parse_args()
    if args.max_replicas < 1:
        p.error("--max-replicas must be at least 1")
    SCALING["max_replicas"] = args.max_replicas  # read by real_run and twin
    model, prompt_tokens = calibrate()
    print(f"replica model, measured here ({REPLICA_THREADS} thread, {REPLICA_ENGINE}): step "
          f"{model.step_base_s * 1e3:.1f} ms + {model.step_per_seq_s * 1e3:.2f} ms per decoding sequence + "
          f"{model.step_per_prefill_token_s * 1e3:.3f} ms per prompt token; KV pool {model.kv_tokens} tokens; "
          f"prompts {prompt_tokens} tokens; load average {os.getloadavg()[0]:.2f}")

    if args.simulate_only:
        model = ReplicaModel(**{**model.__dict__, "start_s": args.start_s})
        print_rows(args, model, prompt_tokens, {})
        return
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.serve.config import GRPC_SERVICER_FUNCTIONS
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=max(2, args.max_replicas * REPLICA_THREADS), include_dashboard=False,
             log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=9123, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    real = {policy: real_run(policy, args.seconds, args.seed, args.slo, args.high_rps, args.ttft_seconds)
            for policy in args.policies}
    serve.shutdown()
    ray.shutdown()
    measured_starts = [r["start_s"] for r in real.values() if r["start_s"] == r["start_s"]]
    start_s = statistics.mean(measured_starts) if measured_starts else model.start_s
    model = ReplicaModel(**{**model.__dict__, "start_s": start_s})
    print(f"replica start, measured in the real runs: {start_s:.1f} s\n")
    print_rows(args, model, prompt_tokens, real)


def print_rows(args, model: ReplicaModel, prompt_tokens: int, real: dict[str, dict]) -> None:
    """The table: each policy's real row (where it ran) and the simulator's."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the simulated policies' decision log
    print(f"arrivals: {LOW_RPS:g} / {args.high_rps:g} / {LOW_RPS:g} req/s over {args.seconds:g} s (seed {args.seed}); "
          f"SLO: TTFT <= {args.slo:g} s; latency's ttftSeconds {args.ttft_seconds or args.slo:g}")
    print("| policy | run | requests | SLO attainment | p99 TTFT | replica-seconds | errors |")
    print("|---|---|---|---|---|---|---|")
    for policy in args.policies:
        r = real.get(policy)
        if r:
            print(f"| {policy} | real | {r['requests']} | {100 * r['attainment']:.1f}% | {r['p99']:.2f} s | "
                  f"{r['replica_s']:,.0f} | {r['errors']} |")
        sims = twin(policy, args.seconds, args.seed, args.slo, args.high_rps, model, prompt_tokens, args.ttft_seconds)
        requests = len(arrivals(args.seconds, args.seed, args.high_rps))

        def span(key: str, scale: float = 1.0, fmt: str = ".1f") -> str:
            values = [scale * m[key] for m in sims]
            return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"
        print(f"| {policy} | simulated ({SIM_SEEDS} seeds) | {requests} | {span('attainment', 100)}% | "
              f"{span('p99', fmt='.2f')} s | {span('replica_s', fmt=',.0f')} | {sum(m['unfinished'] for m in sims)} |",
              flush=True)


if __name__ == "__main__":
    main()
