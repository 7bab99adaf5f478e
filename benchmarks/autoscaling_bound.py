"""How well could any policy that sizes on the load it has seen do on benchmarks/autoscaling.py's traces?
An oracle bound for issue 15's target.

The oracle policy reads the true arrival rate of the trace (the last 30 s, ``--lag`` seconds behind,
as a metrics push would be) and sizes the fleet at ``rate / (MU x u)`` replicas, where MU is a
replica's service rate, given rather than learned, and u the utilisation aimed at. It then holds the
highest size of the last W seconds, which is Kubernetes HPA's scale-down stabilisation window. W = the
trace's length means the fleet never scales down. Everything else is the benchmark's own: the same
traces, seeds, replica model, metrics pipeline and Ray's wrapper (delays, min/max). No real policy
knows the arrival rate this well, so a row is an upper bound for its (u, W).

The oracle sizes no burst before it shows in the rate, and a burst's onset then queues at the replicas
sized for the base load. The rows with an onset target T take the larger of the oracle's size and Ray's
default policy's at ``target_ongoing_requests`` T, which reads that backlog in the requests the replicas
hold and overshoots through it, as the benchmark's default row does in every burst.

    python benchmarks/autoscaling_bound.py [--seconds 1800] [--seeds 4] [--mu 1.7]
"""

from __future__ import annotations

import argparse
import bisect
import math
import multiprocessing
import os
import random
import statistics
import sys
from types import SimpleNamespace

import ray.serve.autoscaling_policy as ray_policy_module
from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingConfig

sys.path.insert(0, os.path.dirname(__file__))
from autoscaling import CLUSTER, RAY_DEFAULTS, SCALING, SLO_TTFT_S, _run, trace  # noqa: E402

UTILISATIONS, WINDOWS_S = (0.6, 0.75, 0.9), (0.0, 300.0, 600.0)  # and "never down": the trace's length
# (u, onset target) pairs run with the windows 600 s and "never down" besides the grid above.
ONSET = ((0.9, 8.0), (0.9, 12.0), (0.9, 16.0))


def _oracle(times: list[float], mu: float, u: float, window_s: float, lag_s: float, onset: float | None):
    held: list[tuple[float, int]] = []  # (time, size) of the last window_s

    def policy(ctx) -> tuple[int, dict]:
        now = ctx.current_time
        rate = (bisect.bisect_left(times, now - lag_s) - bisect.bisect_left(times, now - lag_s - 30.0)) / 30.0
        held.append((now, max(1, math.ceil(rate / (mu * u)))))
        while held[0][0] < now - window_s:
            held.pop(0)
        size = max(size for _, size in held)
        if onset is not None:  # the context's config carries target_ongoing_requests = onset
            size = max(size, replica_queue_length_autoscaling_policy(ctx)[0])
        return size, {}
    return policy


def _one(job: tuple) -> tuple:
    kind, seconds, seed, mu, u, window_s, lag_s, onset = job
    arrivals = trace(kind, seconds, seed)
    fn = _apply_autoscaling_config(_oracle([a.arrival for a in arrivals], mu, u, window_s, lag_s, onset))
    config = AutoscalingConfig(**SCALING, **({"target_ongoing_requests": onset} if onset is not None else {}))
    clock = [0.0]
    real_time = ray_policy_module.time
    ray_policy_module.time = SimpleNamespace(time=lambda: clock[0])  # Ray's delays on the simulated clock
    try:
        result = _run(arrivals, seconds, random.Random(seed), config, fn, clock, CLUSTER, RAY_DEFAULTS, SLO_TTFT_S)
    finally:
        ray_policy_module.time = real_time
    return (kind, u, window_s, onset or 0.0), result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1800.0)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--mu", type=float, default=1.7, help="a replica's service rate, requests/s")
    p.add_argument("--lag", type=float, default=10.0, help="how far behind the rate is read, s")
    args = p.parse_args()
    cells = [(u, w, None) for u in UTILISATIONS for w in (*(w for w in WINDOWS_S if w < args.seconds), args.seconds)]
    cells += [(u, w, t) for u, t in ONSET for w in (min(600.0, args.seconds), args.seconds)]
    jobs = [(kind, args.seconds, seed, args.mu, u, w, args.lag, t) for u, w, t in dict.fromkeys(cells)
            for kind in ("bursty", "diurnal") for seed in range(args.seeds)]
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        results = pool.map(_one, jobs)
    rows: dict[tuple, list[dict]] = {}
    for key, result in results:
        rows.setdefault(key, []).append(result)
    print(f"oracle: rate / ({args.mu:g} req/s x u), read {args.lag:g} s behind, the highest size of the last W s "
          f"held; onset T: or Ray's default at target_ongoing_requests T, whichever is larger; "
          f"seeds 0-{args.seeds - 1}, mean\n")
    print("| trace | u | W | onset T | SLO attainment | replica-seconds |")
    print("|---|---|---|---|---|---|")
    for (kind, u, w, t), rs in sorted(rows.items()):
        print(f"| {kind} | {u:g} | {'never down' if w >= args.seconds else f'{w:g} s'} | {f'{t:g}' if t else '-'} | "
              f"{100 * statistics.mean(r['attainment'] for r in rs):.1f}% | "
              f"{statistics.mean(r['replica_s'] for r in rs):,.0f} |")


if __name__ == "__main__":
    main()
