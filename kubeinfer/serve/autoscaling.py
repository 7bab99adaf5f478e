"""LLM-aware autoscaling for the Worker deployment, inside Ray Serve's own machinery.

Signal path: the engine's gauges (``EngineReplica.report()``, the numbers the ``vllm:*`` metrics
show) and the replica's recent latencies (LatencyWindow) -> ``Worker.record_autoscaling_stats`` (via
``replica_stats``) -> Serve's controller, which averages each replica's samples over
``look_back_period_s`` -> ``AutoscalingContext.aggregated_metrics`` -> ``LLMAutoscalingPolicy``
(named in ``autoscaling_config.policy``) -> Ray's wrapper (up/down delays, scaling factors, min/max).
Requests held before any replica reach the policy as ``AutoscalingContext.total_queued_requests``:
those in the router's admission queue (``kubeinfer.serve.ingress.RouterQueueReporter`` reports them
as a handle's queued requests) and those Serve's handles hold for want of a replica (a scale from
zero, where Ray's wrapper starts the first replica before the policy is asked).

Pure: no Ray import, so the policies run in unit tests and in benchmarks/autoscaling.py on a
stand-in context. Ray pickles this module by value to the controller, so it imports only the
standard library.
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Mapping

# The custom metric names a Worker replica reports (one sample per metrics push).
KV_CACHE_USAGE = "kv_cache_usage"            # fraction of KV blocks in use, vllm:kv_cache_usage_perc
WAITING = "num_requests_waiting"             # vllm:num_requests_waiting
RUNNING = "num_requests_running"             # vllm:num_requests_running
PREEMPTIONS_PER_S = "preemptions_per_s"      # rate of vllm:num_preemptions over the last push interval
TTFT_P90_S = "ttft_p90_s"                    # replica-side TTFT (call in -> first token) of recent requests
ITL_P90_S = "itl_p90_s"                      # engine-side mean inter-token latency of recent requests

POLICIES = ("ongoingRequests", "kvCache", "queue", "latency")
POLICY_FUNCTION = "kubeinfer.serve.autoscaling:LLMAutoscalingPolicy"
# The key in Ray's policy_state where the last decision's reason is kept (the CR status shows it).
DECISION_KEY = "kubeinfer_decision"
_QUEUE_REF_KEY = "kubeinfer_queue_ref"  # (time, requests held) the latency policy measures growth from
_CAPACITY_KEY = "kubeinfer_capacity"    # the latency policy's learned requests per replica at the SLO
_RECENT_KEY = "kubeinfer_recent"        # the last RECENT_DECISIONS published decisions, oldest first
# Decisions kept for the operator: the one that moved the count may be superseded by the time it
# looks (it refreshes every 10 s; a policy can change its mind within a tick of Serve acting).
RECENT_DECISIONS = 8
_LOGGED_KEY = "kubeinfer_logged_at"     # when the last decision was logged
_log = logging.getLogger("ray.serve")
# Where each deployment's recent scale decisions are published (Ray's internal KV, on the GCS): Serve's
# REST API does not carry a policy's reasons, and the policy_state stays inside the controller.
DECISIONS_KV_NAMESPACE = "kubeinfer"
DECISIONS_PATH = "/kubeinfer/autoscaling"  # where an application's router serves them, as JSON


class LatencyWindow:
    """Recent latencies of one replica for the TTFT / ITL percentiles: a TTFT sample when a request's
    first token leaves the engine (so a burst shows while its requests still stream), an ITL sample
    when it finishes (the engine's decode phase / its tokens). Owns two bounded deques of the last
    ``window_s`` seconds; ``now`` is any monotonic clock in seconds."""

    def __init__(self, window_s: float = 30.0, max_samples: int = 512) -> None:
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._itl: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def first_token(self, ttft_s: float, now: float) -> None:
        self._ttft.append((now, ttft_s))

    def finished(self, timings: Mapping[str, float] | None, completion_tokens: int, now: float) -> None:
        """Records one finished request's ITL from its RequestOutput.timings (decode / (tokens - 1))."""
        if timings and "decode" in timings and completion_tokens > 1:
            self._itl.append((now, timings["decode"] / (completion_tokens - 1)))

    def p90(self, now: float) -> tuple[float, float]:
        """(TTFT p90, ITL p90) over the window; 0.0 where there is no sample."""
        for samples in (self._ttft, self._itl):
            while samples and now - samples[0][0] > self.window_s:
                samples.popleft()
        return _p90([s[1] for s in self._ttft]), _p90([s[1] for s in self._itl])


def _p90(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]


def replica_stats(report: Any, preemptions_per_s: float, latency: tuple[float, float]) -> dict[str, float]:
    """One replica's custom autoscaling metrics from its ReplicaReport (the one source of the
    gauges), its preemption rate and its (TTFT p90, ITL p90)."""
    return {KV_CACHE_USAGE: float(report.kv_cache_usage), WAITING: float(report.num_requests_waiting),
            RUNNING: float(report.num_requests_running), PREEMPTIONS_PER_S: float(preemptions_per_s),
            TTFT_P90_S: float(latency[0]), ITL_P90_S: float(latency[1])}


@dataclass(frozen=True)
class PolicySettings:
    """The policy and its targets: what ``autoscaling_config.policy.policy_kwargs`` holds.

    Hysteresis: a policy scales up when its load ratio (signal / target) exceeds ``1 + up_tolerance``
    and down when it falls under ``1 - down_tolerance``; in between it holds the current target
    (which also resets Ray's delay timers, so noise never accumulates into a scale change). Steps:
    up by at most ``max(min_scale_up_step, ceil(target * (max_scale_up_factor - 1)))`` replicas per
    decision from the current target (Kubernetes HPA's default scale-up rule: 4 pods or 100%), down
    by at most ``max(1, floor(n * max_scale_down_fraction))`` of the ``n`` running replicas.
    """

    policy: str = "kvCache"
    target_kv_cache_usage: float = 0.7
    target_queue_length: float = 2.0
    ttft_seconds: float = 1.0
    queue_horizon_seconds: float = 60.0
    up_tolerance: float = 0.1
    down_tolerance: float = 0.3
    max_scale_up_factor: float = 2.0
    min_scale_up_step: int = 4
    max_scale_down_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.policy not in POLICIES[1:]:
            raise ValueError(f"policy must be one of {', '.join(POLICIES[1:])}, got {self.policy!r}")
        if not 0 < self.target_kv_cache_usage <= 1:
            raise ValueError(f"target_kv_cache_usage must be in (0, 1], got {self.target_kv_cache_usage!r}")
        for name in ("target_queue_length", "ttft_seconds", "max_scale_down_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.queue_horizon_seconds < 0 or self.up_tolerance < 0 or not 0 <= self.down_tolerance < 1:
            raise ValueError("need queue_horizon_seconds >= 0, up_tolerance >= 0 and 0 <= down_tolerance < 1")
        if not self.max_scale_up_factor > 1 or self.max_scale_down_fraction > 1:
            raise ValueError("need max_scale_up_factor > 1 and 0 < max_scale_down_fraction <= 1")
        if not (isinstance(self.min_scale_up_step, int) and self.min_scale_up_step >= 1):
            raise ValueError(f"min_scale_up_step must be an integer >= 1, got {self.min_scale_up_step!r}")

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def _mean(ctx: Any, name: str) -> list[float]:
    """The named metric for each running replica (0.0 for one that has not reported yet)."""
    values = (ctx.aggregated_metrics or {}).get(name, {})
    return [float(values.get(r, 0.0)) for r in ctx.running_replicas]


def _latest(ctx: Any, name: str) -> list[float]:
    """Each running replica's newest raw sample of the metric (falls back to the aggregate)."""
    raw = (ctx.raw_metrics or {}).get(name, {})
    agg = (ctx.aggregated_metrics or {}).get(name, {})
    out = []
    for r in ctx.running_replicas:
        series = raw.get(r)
        out.append(float(max(series, key=lambda v: v.timestamp).value) if series else float(agg.get(r, 0.0)))
    return out


def load_ratio(ctx: Any, s: PolicySettings, state: dict[str, Any], values: Any = None) -> tuple[float, str]:
    """The policy's load / target (1.0 = on target) and a short reason, from per-replica ``values``
    (``_mean``: the look-back means, the default; ``_latest``: the newest samples); updates
    ``state`` with the latency policy's queue reference and learned capacity."""
    _per_replica = values or _mean
    n = max(1, len(ctx.running_replicas))
    # Requests held before any replica: in the router's admission queue (the Serve ingress reports it
    # as a handle's queued requests) and in Serve's handles. They wait like a replica's queue does.
    held_before = float(getattr(ctx, "total_queued_requests", 0.0) or 0.0)
    if s.policy == "kvCache":
        kv = sum(_per_replica(ctx, KV_CACHE_USAGE)) / n
        ratio, why = kv / s.target_kv_cache_usage, f"kvCache {kv:.2f} vs {s.target_kv_cache_usage:.2f}"
        if any(p > 0 for p in _per_replica(ctx, PREEMPTIONS_PER_S)):
            # Preemption means a replica ran out of blocks: recompute wastes its step time, so add
            # capacity now rather than when the mean catches up.
            ratio, why = max(ratio, 1 + s.up_tolerance + 1e-9), why + ", preempting"
        waiting = (sum(_per_replica(ctx, WAITING)) + held_before) / n
        if waiting >= s.target_queue_length:
            # Requests wait while blocks are free: another limit binds (max_num_seqs, the step's
            # token budget); the KV target cannot be reached by this fleet, so it is over capacity,
            # by as much as the queue policy would read from the same queue.
            ratio = max(ratio, 1 + s.up_tolerance + 1e-9, waiting / s.target_queue_length)
            why += f", {waiting:.1f} waiting/replica"
        return ratio, why
    waiting = sum(_per_replica(ctx, WAITING)) + held_before
    if s.policy == "queue":
        return waiting / n / s.target_queue_length, f"queue {waiting / n:.2f}/replica vs {s.target_queue_length:g}"
    # latency: p90 TTFT against the SLO. TTFT lags load (it is sampled at first tokens and averaged
    # over the look-back window), so the leading signal is the requests the replicas hold (running +
    # waiting), projected ``queue_horizon_seconds`` ahead at its growth, against what a replica holds
    # at the SLO. That capacity is learned here (requests per replica x SLO / TTFT, from samples where
    # TTFT is within 0.8-1.25x the SLO: far below it TTFT does not track load, far above it is a
    # backlog's past), smoothed in policy_state.
    ttfts = [t for t in _per_replica(ctx, TTFT_P90_S) if t > 0]
    ttft = sum(ttfts) / len(ttfts) if ttfts else 0.0
    held = waiting + sum(_per_replica(ctx, RUNNING))
    now = ctx.current_time or 0.0
    t0, q0 = state.get(_QUEUE_REF_KEY) or (now, held)
    growth = (held - q0) / (now - t0) if now - t0 > 0 else 0.0
    falling = growth < 0
    if now - t0 >= max(1.0, s.queue_horizon_seconds / 6) or _QUEUE_REF_KEY not in state:
        state[_QUEUE_REF_KEY] = (now, held)
    # Until a capacity is learned, the deployment's target_ongoing_requests (Ray's default policy's
    # target, 2 unless set) stands in: the policy starts as cautious as Ray's and learns from there.
    fallback = getattr(getattr(ctx, "config", None), "target_ongoing_requests", None) or 2.0
    capacity = state.get(_CAPACITY_KEY)
    # Not while the load falls: TTFT is a window's percentile, so as a backlog drains it stays high
    # while the replicas already hold few requests, and learning then would take their capacity for
    # a fraction of what it is (and hold the fleet at its peak long after the load has gone).
    if 0.8 * s.ttft_seconds <= ttft <= 1.25 * s.ttft_seconds and held > 0 and not falling:
        estimate = held / n * s.ttft_seconds / ttft
        capacity = estimate if capacity is None else 0.9 * capacity + 0.1 * estimate
        state[_CAPACITY_KEY] = capacity
    elif 0 < ttft < 0.8 * s.ttft_seconds and held > 0 and waiting < n and \
            abs(growth) * s.queue_horizon_seconds <= 0.25 * held:
        # Comfortably under the SLO, next to no queue (the TTFT samples cover the requests held) and
        # a steady load (so TTFT has caught up with it): a replica holds this many within the SLO,
        # a lower bound on its capacity. Without it, a fleet that never comes near its SLO would be
        # sized on the fallback forever.
        if held / n > (capacity or fallback):
            capacity = held / n
            state[_CAPACITY_KEY] = capacity
    if values is _latest:
        growth = 0.0  # the newest samples already lead; growth is measured on the means' basis
    projected = max(held, held + growth * s.queue_horizon_seconds) / n
    ratio = projected / (capacity or fallback)
    if (ttft > s.ttft_seconds and not falling) or capacity is None:
        # Over the SLO TTFT decides too; under it, load against the learned capacity does: TTFT has a
        # floor (a long prompt's prefill) that more replicas do not lower, so it cannot say when
        # fewer replicas would still do.
        ratio = max(ratio, ttft / s.ttft_seconds)
    return ratio, (f"latency ttft p90 {ttft:.2f}s vs {s.ttft_seconds:g}s, {projected:.1f} requests/replica "
                   f"projected vs {capacity or fallback:.1f}")


def decide(ctx: Any, s: PolicySettings) -> tuple[int, dict[str, Any]]:
    """The desired replica count for ``ctx`` (an AutoscalingContext) under ``s``, and the policy
    state to keep. Invariants: the result is within the context's capacity-adjusted [min, max];
    it never drops below the replicas whose latest sample still holds running requests; one call
    moves the target by a bounded step; inside the hysteresis band it is the current target."""
    state = dict(ctx.policy_state or {})
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas
    n = len(ctx.running_replicas)
    # Requests Serve counts for the deployment (those on replicas and those its handles hold for want
    # of one): while any is there, at least one replica, so a scale to zero never strands them and a
    # scale from zero starts one (Ray's wrapper has the same cold-start path ahead of the policy).
    floor = 1 if (getattr(ctx, "total_num_requests", 0) or 0) > 0 else 0
    if n == 0:  # nothing reports yet: hold, or start one for the requests waiting
        return max(lo, min(hi, max(current, floor))), state
    # Up on the newest samples, down only when both they and the look-back means are low: a burst
    # shows one metrics push after it starts, instead of after the mean has caught up, and a
    # momentary lull does not remove replicas.
    # The newest samples' view first, on a copy of the state as the tick found it: both views
    # measure the load's growth from the same reference.
    fresh, fresh_why = load_ratio(ctx, s, dict(state), _latest)
    ratio, why = load_ratio(ctx, s, state)
    if fresh > ratio:
        ratio, why = fresh, fresh_why + " (newest samples)"
    desired = current
    if ratio > 1 + s.up_tolerance:
        # The need is sized from the replicas that report (``n``: their load per replica x ratio);
        # replicas still starting already count in ``current``, so asking again for them would
        # overshoot. The step is bounded from ``current``, not ``n``: bounded from ``n``, a fleet could
        # grow only as fast as its replicas start, one doubling per start, and a burst outran it.
        step = max(s.min_scale_up_step, math.ceil(current * (s.max_scale_up_factor - 1)))
        desired = max(current, n + 1, min(current + step, math.ceil(n * ratio)))
    elif ratio < 1 - s.down_tolerance:
        step = max(1, math.floor(n * s.max_scale_down_fraction))
        busy = sum(1 for r in _latest(ctx, RUNNING) if r > 0)
        # Aim inside the band (not at its upper edge), so the first noisy sample after a scale-down
        # does not scale straight back up.
        aim = math.ceil(n * ratio / (1 - s.down_tolerance / 2))
        desired = min(current, max(current - step, aim, busy))
    desired = max(lo, min(hi, max(desired, floor)))
    state[DECISION_KEY] = f"{why}: {current} -> {desired}" if desired != current else f"{why}: hold {current}"
    now = ctx.current_time or 0.0
    recent = state.get(_RECENT_KEY, [])
    if desired != current and (not recent or (recent[-1]["from"], recent[-1]["to"]) != (current, desired)):
        # Once per change of mind, not per tick, and each one at once: Serve may act on it within a
        # tick (a short upscale delay), after which it is not wished again. For the CR's status (the
        # application's router serves what publish_decisions puts) and, at most every 10 s, for the
        # Serve controller's log, next to Ray's own "Upscaling ..." lines.
        recent = [*recent[1 - RECENT_DECISIONS:],
                  {"policy": s.policy, "reason": why, "from": current, "to": desired, "time": now}]
        publish_decisions(getattr(ctx, "app_name", ""), getattr(ctx, "deployment_name", ""), recent)
        state[_RECENT_KEY] = recent
        if now - state.get(_LOGGED_KEY, -1e18) >= 10:
            _log.info("kubeinfer autoscaling %s: %s", getattr(ctx, "deployment_name", "?"), state[DECISION_KEY])
            state[_LOGGED_KEY] = now
    return desired, state


def decision_key(app_name: str, deployment_name: str) -> bytes:
    return f"autoscaling/{app_name}/{deployment_name}".encode()


def _internal_kv() -> Any:
    """Ray's internal KV when this process is connected to a Ray cluster (the Serve controller, a
    replica), else None (a unit test, the simulator). Imported here: the module stays Ray-free."""
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return None
    return internal_kv if internal_kv._internal_kv_initialized() else None


def publish_decisions(app_name: str, deployment_name: str, records: list[Mapping[str, Any]]) -> None:
    """Puts a deployment's recent scale decisions (each: policy, reason, from, to, time; oldest
    first) where its application's router reads them (``read_decisions``). Best effort: a failed put
    must not stop the policy."""
    kv = _internal_kv()
    if kv is None:
        return
    try:
        kv._internal_kv_put(decision_key(app_name, deployment_name), json.dumps([dict(r) for r in records]).encode(),
                            overwrite=True, namespace=DECISIONS_KV_NAMESPACE)
    except Exception as e:  # the GCS unreachable for a moment: the next decision publishes again
        _log.warning("kubeinfer autoscaling: cannot publish the decisions of %s: %s", deployment_name, e)


def read_decisions(app_name: str, deployment_name: str) -> list[dict[str, Any]]:
    """The deployment's recent published decisions, oldest first; [] when there are none (or no Ray
    here). Blocking (a GCS call)."""
    kv = _internal_kv()
    value = kv._internal_kv_get(decision_key(app_name, deployment_name), namespace=DECISIONS_KV_NAMESPACE) \
        if kv is not None else None
    return json.loads(value) if value else []


class LLMAutoscalingPolicy:
    """Ray Serve custom autoscaling policy (``policy_function`` = POLICY_FUNCTION): Ray builds one
    instance per deployment with ``policy_kwargs`` (PolicySettings' fields) and calls it with an
    AutoscalingContext each control-loop tick. Stateless itself: what it keeps between ticks lives
    in the returned policy_state, which Ray hands back in the next context."""

    def __init__(self, **kwargs: Any) -> None:
        self.settings = PolicySettings(**kwargs)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return decide(ctx, self.settings)


def ray_policy(settings: PolicySettings | None) -> dict[str, Any] | None:
    """``autoscaling_config.policy`` for ``settings`` (None: Ray's default ongoing-requests policy)."""
    if settings is None:
        return None
    return {"policy_function": POLICY_FUNCTION, "policy_kwargs": settings.kwargs()}
