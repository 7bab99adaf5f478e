"""LLM autoscaling (issue 15): the policies on recorded metric sequences, run through Ray Serve's own
wrapper (delays, scaling factors) exactly as the Serve controller calls them; the worker's signals;
and the surfaces that carry a policy (Serve config, CR spec, `kubeinfer serve` flags)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from kubeinfer.serve.autoscaling import (DECISION_KEY, KV_CACHE_USAGE, PREEMPTIONS_PER_S, RUNNING, TTFT_P90_S,
                                         WAITING, LatencyWindow, LLMAutoscalingPolicy, PolicySettings, ray_policy,
                                         replica_stats)

ray_serve = pytest.importorskip("ray.serve")
from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402
from ray.serve.autoscaling_policy import _apply_autoscaling_config  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402

TICK_S = 0.5
DEP = DeploymentID(name="worker-m", app_name="app")


class Controller:
    """Serve's controller loop in miniature: replicas' metrics in, the wrapped policy called each
    tick, its decision bounded and applied at once (replica start-up is not modelled here)."""

    def __init__(self, policy: dict, replicas: int = 1, **config) -> None:
        cfg = {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 2.0, "downscale_delay_s": 10.0, **config}
        self.config = AutoscalingConfig(**cfg, policy=ray_policy(PolicySettings(**policy)))
        self.policy = _apply_autoscaling_config(LLMAutoscalingPolicy(**policy))
        self.target = replicas
        self.state: dict = {}
        self.now = 1000.0
        self.history: list[int] = []

    def tick(self, **per_replica_metrics: float | list[float]) -> int:
        """One control-loop tick with every replica reporting the given metrics (a list gives each
        replica its own value); returns the new target."""
        ids = [ReplicaID(f"r{i}", DEP) for i in range(self.target)]
        metrics = {}
        for name, v in per_replica_metrics.items():
            values = v if isinstance(v, list) else [v] * len(ids)
            metrics[name] = {r: float(values[i % len(values)]) for i, r in enumerate(ids)}
        ctx = AutoscalingContext(
            deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=len(ids),
            target_num_replicas=self.target, running_replicas=ids, total_num_requests=0.0,
            total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={},
            capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas, policy_state=dict(self.state),
            last_scale_up_time=None, last_scale_down_time=None, current_time=self.now, config=self.config)
        import ray.serve.autoscaling_policy as ap
        real_time = ap.time
        ap.time = SimpleNamespace(time=lambda: self.now)  # Ray's delay logic reads its module's clock
        try:
            decision, self.state = self.policy(ctx)
        finally:
            ap.time = real_time
        self.target = max(self.config.min_replicas, min(self.config.max_replicas, int(decision)))
        self.now += TICK_S
        self.history.append(self.target)
        return self.target

    def run(self, seconds: float, **metrics) -> list[int]:
        return [self.tick(**metrics) for _ in range(int(seconds / TICK_S))]


def ticks(seconds: float) -> int:
    return int(seconds / TICK_S)


def test_kv_cache_scales_up_within_the_delay_and_holds_on_noise():
    c = Controller({"policy": "kvCache", "target_kv_cache_usage": 0.7})
    seq = c.run(10, kv_cache_usage=0.5, num_requests_running=4)
    assert set(seq) == {1}
    up = c.run(3, kv_cache_usage=0.95, num_requests_running=8)
    assert up[ticks(2.0) - 1] == 1 and up[-1] >= 2  # not before the 2 s delay, soon after it
    assert "kvCache 0.95" in c.state[DECISION_KEY]
    # Noise around the target, inside the band: no change in a minute.
    before = c.target
    for i in range(ticks(60)):
        c.tick(kv_cache_usage=[0.62, 0.76][i % 2], num_requests_running=4)
    assert set(c.history[-ticks(60):]) == {before}


def test_kv_cache_preemption_scales_up_early():
    c = Controller({"policy": "kvCache"})
    c.run(3, kv_cache_usage=0.6, preemptions_per_s=0.5, num_requests_running=8)
    assert c.target == 2  # the mean is under target, but a replica preempts


def test_scale_down_waits_for_the_down_delay_and_steps_are_bounded():
    c = Controller({"policy": "kvCache", "max_scale_down_fraction": 0.25}, replicas=8)
    seq = c.run(9, kv_cache_usage=0.05, num_requests_running=0)
    assert set(seq) == {8}  # downscale_delay_s is 10
    seq = c.run(2, kv_cache_usage=0.05, num_requests_running=0)
    assert seq[-1] == 6  # at most a quarter of 8 per decision
    c.run(60, kv_cache_usage=0.05, num_requests_running=0)
    assert c.target == 1  # down to min_replicas, never below


def test_scale_down_keeps_the_replicas_that_hold_running_requests():
    c = Controller({"policy": "queue", "target_queue_length": 2}, replicas=6)
    c.run(60, num_requests_waiting=0, num_requests_running=[1, 1, 1, 0, 0, 0], kv_cache_usage=0.1)
    assert c.target == 3


def test_max_replicas_bounds_scale_up():
    c = Controller({"policy": "queue", "target_queue_length": 1}, max_replicas=20)
    c.run(60, num_requests_waiting=50, num_requests_running=8)
    assert c.target == 20 and max(c.history) == 20
    # Bounded steps on the way (HPA's rule): at most 4 replicas or a doubling per decision, so the
    # 50x load took several decisions, not one.
    steps = [(a, b) for a, b in zip(c.history, c.history[1:]) if b != a]
    assert len(steps) >= 3 and all(b <= max(a + 4, 2 * a) for a, b in steps)


def test_queue_policy_holds_under_target_and_scales_on_a_rising_queue():
    c = Controller({"policy": "queue", "target_queue_length": 2}, replicas=2)
    for i in range(ticks(30)):
        c.tick(num_requests_waiting=[1.5, 2.1][i % 2], num_requests_running=8)
    assert set(c.history) == {2}
    c.run(3, num_requests_waiting=6, num_requests_running=8)
    assert c.target >= 3


def test_latency_policy_scales_on_queue_growth_before_ttft_breaches():
    c = Controller({"policy": "latency", "ttft_seconds": 2.0,
                    "queue_horizon_seconds": 30})
    # Before a capacity is learned, target_ongoing_requests (2) requests per replica stand in for it.
    c.run(10, ttft_p90_s=0.5, num_requests_waiting=0, num_requests_running=1.5)
    assert c.target == 1
    # TTFT still well under the SLO and the count under 2, but the queue grows by 0.5 requests a second.
    for i in range(ticks(3)):
        c.tick(ttft_p90_s=0.6, num_requests_waiting=0.25 * i, num_requests_running=1)
    assert c.target >= 2
    c2 = Controller({"policy": "latency", "ttft_seconds": 2.0})
    c2.run(3, ttft_p90_s=3.0, num_requests_waiting=0, num_requests_running=8)
    assert c2.target >= 2  # a breached SLO scales up by itself


def test_policy_settings_refuse_bad_values_naming_the_field():
    for kwargs, field in [({"policy": "cpu"}, "policy"), ({"target_kv_cache_usage": 1.5}, "target_kv_cache_usage"),
                          ({"target_kv_cache_usage": 0}, "target_kv_cache_usage"),
                          ({"ttft_seconds": 0}, "ttft_seconds"), ({"target_queue_length": -1}, "target_queue_length"),
                          ({"min_scale_up_step": 0}, "min_scale_up_step")]:
        with pytest.raises(ValueError, match=field):
            PolicySettings(**kwargs)


def test_latency_window_and_replica_stats():
    w = LatencyWindow(window_s=10)
    for i in range(10):
        w.first_token(0.1 * (i + 1), now=float(i))
        w.finished({"queue": 0.0, "prefill": 0.1, "decode": 0.9}, 10, now=float(i))
    w.finished({"queue": 5.0}, 0, now=9.0)  # never got a first token: no ITL sample
    ttft, itl = w.p90(now=9.0)
    assert ttft == pytest.approx(0.9) and itl == pytest.approx(0.1)
    assert w.p90(now=100.0) == (0.0, 0.0)  # old samples leave the window
    report = SimpleNamespace(kv_cache_usage=0.5, num_requests_waiting=3, num_requests_running=7)
    stats = replica_stats(report, 0.25, (0.9, 0.1))
    assert stats == {KV_CACHE_USAGE: 0.5, WAITING: 3.0, RUNNING: 7.0, PREEMPTIONS_PER_S: 0.25,
                     TTFT_P90_S: 0.9, "itl_p90_s": 0.1}


def test_worker_reports_the_replica_report_and_a_preemption_rate():
    import time
    from kubeinfer.router.types import ReplicaReport
    from kubeinfer.serve.worker import Worker
    worker = Worker.func_or_class.__new__(Worker.func_or_class)  # no engine: only the stats path
    report = ReplicaReport("r0", num_requests_running=5, num_requests_waiting=2, kv_cache_usage=0.4,
                           num_preemptions=10)
    worker.replica = SimpleNamespace(report=lambda: report,
                                     engine=SimpleNamespace(shutdown=lambda timeout: None))
    worker.latency = LatencyWindow()
    worker._preemptions = (time.monotonic() - 2.0, 4)
    stats = worker.record_autoscaling_stats()
    assert stats[RUNNING] == 5 and stats[WAITING] == 2 and stats[KV_CACHE_USAGE] == 0.4
    assert stats[PREEMPTIONS_PER_S] == pytest.approx(3.0, rel=0.05)  # 6 preemptions in ~2 s
    assert all(isinstance(v, float) for v in stats.values())  # what Ray accepts


# ---- surfaces: the CR spec, the rendered Serve config, `kubeinfer serve` ---------------------------

def _md(autoscaling: dict | None, **spec) -> dict:
    body = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1}, "spec": spec}
    if autoscaling is not None:
        body["spec"]["autoscaling"] = autoscaling
    return body


@pytest.mark.parametrize("auto, field", [
    ({"maxReplicas": 2, "policy": "cpu"}, "spec.autoscaling.policy"),
    ({"maxReplicas": 2, "policy": "kvCache", "targetKvCacheUsage": 1.5}, "spec.autoscaling.targetKvCacheUsage"),
    ({"maxReplicas": 2, "policy": "kvCache", "targetKvCacheUsage": 0}, "spec.autoscaling.targetKvCacheUsage"),
    ({"maxReplicas": 2, "policy": "latency", "ttftSeconds": -1}, "spec.autoscaling.ttftSeconds"),
    ({"maxReplicas": 2, "policy": "latency", "ttftSeconds": "1s"}, "spec.autoscaling.ttftSeconds"),
    ({"maxReplicas": 2, "policy": "queue", "targetQueueLength": 0}, "spec.autoscaling.targetQueueLength"),
    ({"maxReplicas": 2, "policy": "queue", "ttftSeconds": 1}, "spec.autoscaling.ttftSeconds"),
    ({"maxReplicas": 2, "policy": "latency", "targetQueueLength": 1}, "spec.autoscaling.targetQueueLength"),
    ({"maxReplicas": 2, "targetKvCacheUsage": 0.5}, "spec.autoscaling.targetKvCacheUsage"),
])
def test_the_operator_refuses_bad_policy_values_naming_the_field(auto, field):
    from kubeinfer.operator.spec import SpecError, parse_spec
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(_md(auto))


def test_the_rendered_serve_config_carries_the_policy():
    import yaml
    from kubeinfer.operator.render import build_rayservice, build_serve_config
    body = _md({"maxReplicas": 4, "policy": "latency", "ttftSeconds": 0.5, "targetOngoingRequests": 3})
    for config in (build_serve_config(body),
                   yaml.safe_load(build_rayservice(body)["spec"]["serveConfigV2"])):
        auto = config["applications"][0]["args"]["models"][0]["autoscaling"]
        assert auto["policy"]["policy_function"] == "kubeinfer.serve.autoscaling:LLMAutoscalingPolicy"
        assert auto["policy"]["policy_kwargs"]["policy"] == "latency"
        assert auto["policy"]["policy_kwargs"]["ttft_seconds"] == 0.5
        assert auto["target_ongoing_requests"] == 3  # what latency starts from, before it learns
        # What Ray itself makes of it: its AutoscalingConfig loads our policy class.
        cfg = AutoscalingConfig(**auto)
        assert cfg.policy.get_policy() is LLMAutoscalingPolicy
    default = build_serve_config(_md({"maxReplicas": 4}))["applications"][0]["args"]["models"][0]["autoscaling"]
    assert "policy" not in default  # ongoingRequests: Ray's default policy, unchanged


def _serve_app(*flags: str):
    from kubeinfer.cli import build_parser
    from kubeinfer.serve.command import app_config_from_args
    return app_config_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]))


def test_serve_flags_choose_the_policy():
    app = _serve_app("--max-replicas", "4", "--autoscaling-policy", "kvCache", "--target-kv-cache-usage", "0.6",
                     "--upscale-delay-s", "1", "--downscale-delay-s", "5")
    auto = app.models[0].autoscaling
    assert auto["upscale_delay_s"] == 1 and auto["downscale_delay_s"] == 5
    assert auto["policy"]["policy_kwargs"]["policy"] == "kvCache"
    assert auto["policy"]["policy_kwargs"]["target_kv_cache_usage"] == 0.6
    assert "policy" not in _serve_app("--max-replicas", "4").models[0].autoscaling
    for flags, fragment in [(["--max-replicas", "2", "--autoscaling-policy", "kvCache", "--target-kv-cache-usage",
                              "2"], "--target-kv-cache-usage"),
                            (["--max-replicas", "2", "--ttft-seconds", "1"], "--ttft-seconds"),
                            (["--ttft-seconds", "1"], "--autoscaling-policy"),
                            (["--max-replicas", "2", "--autoscaling-policy", "latency", "--ttft-seconds", "0"],
                             "--ttft-seconds")]:
        with pytest.raises(ValueError, match=fragment):
            _serve_app(*flags)


def test_the_simulator_runs_each_policy_and_loses_no_request():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import autoscaling as sim
    finally:
        sys.path.pop(0)
    arrivals = sim.trace("bursty", 120, seed=1)
    for policy, extra, targets, _ in sim.RUNS:
        fresh = [sim.Req(a.arrival, a.prompt, a.output) for a in arrivals]
        m = sim.simulate(fresh, policy, 120, 1, targets, **sim.SCALING, **extra)
        assert m["unfinished"] == 0 and 0 < m["attainment"] <= 1 and m["replica_s"] >= 2 * 120, (policy, m)


def test_worker_samples_ttft_at_the_first_token_and_itl_at_the_end():
    from kubeinfer.router.types import Chunk, ReplicaReport
    from kubeinfer.serve.worker import Worker

    async def fake_batch(jobs):
        yield -1, ReplicaReport("r0")
        yield 0, Chunk("a", token_ids=[1])
        yield 1, Chunk("b", finish_reason="rejected", error="no")  # no token: no TTFT sample
        yield 0, Chunk("a", token_ids=[2], finish_reason="stop", completion_tokens=5,
                       timings={"queue": 0.0, "prefill": 0.1, "decode": 0.4})

    worker = Worker.func_or_class.__new__(Worker.func_or_class)
    worker.replica = SimpleNamespace(generate_batch=fake_batch, engine=SimpleNamespace(shutdown=lambda timeout: None))
    worker.latency = LatencyWindow()

    async def run():
        return [item async for item in worker.generate_batch([object(), object()])]
    assert len(asyncio.run(run())) == 4  # every item still reaches the router
    assert len(worker.latency._ttft) == 1
    assert worker.latency.p90(worker.latency._ttft[0][0])[1] == pytest.approx(0.1)  # 0.4 s / 4 gaps


# ---- end to end on the session's local Ray ------------------------------------------------------------

def test_kv_cache_policy_scales_a_real_deployment_up_and_back_without_losing_a_request(ray_head, tiny_llama_dir):
    """One replica whose engine holds 2 sequences; 8 concurrent streams leave 6 waiting, which the
    kvCache policy reads as over capacity (another limit binds): Serve adds a replica; when the load
    ends it goes back to one. Every stream completes."""
    import time

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.operator.status import observe_serve_application
    from kubeinfer.serve.app import build_app
    from kubeinfer.serve.config import GRPC_SERVICER_FUNCTIONS, AppConfig, ModelSpec
    from tests.conftest import free_port

    app_name = "kubeinfer-autoscaling"
    ray.init(address=ray_head["address"], log_to_driver=False)
    serve.shutdown()  # one Serve per Ray: another module's app may be running
    grpc_port, http_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    auto = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "upscale_delay_s": 0.5,
            "downscale_delay_s": 3.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
            "policy": ray_policy(PolicySettings(policy="kvCache"))}
    app = AppConfig(models=[ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256,
                                      engine={"num_kv_blocks": 160, "max_num_seqs": 2}, autoscaling=auto)])

    def running() -> int:
        return _running_replicas(app_name)

    try:
        serve.run(build_app(app.to_dict()), name=app_name, route_prefix="/auto")
        assert running() == 1
        deadline = time.monotonic() + 60
        results = asyncio.run(_grpc_load(grpc_port, app_name, lambda: running() >= 2 or time.monotonic() > deadline))
        assert running() == 2, "no scale-up under load"
        assert results and all(r["error"] is None and len(r["tokens"]) == 64 for r in results)
        deadline = time.monotonic() + 60
        while running() > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert running() == 1, "no scale-down after the load ended"
        # What the operator reads back, through the same client: the counts from Serve's REST API
        # and the policy's last decision with its reason from the router (the CR's status).
        details, decisions = asyncio.run(_operator_reads(ray_head["dashboard"], http_port, "/auto"))
        obs = observe_serve_application(details, app_name, ["worker-tiny"])
        assert (obs.replicas, obs.ready_replicas, obs.counted) == (1, 1, True)
        decision = decisions["tiny"][-1]  # the newest of the recent ones
        assert [(d["from"], d["to"]) for d in decisions["tiny"]][:1] == [(1, 2)]  # the scale-up's too
        assert decision["policy"] == "kvCache" and decision["reason"].startswith("kvCache ")
        assert (decision["from"], decision["to"]) == (2, 1) and decision["time"] > time.time() - 120
    finally:
        serve.shutdown()
        ray.shutdown()


async def _operator_reads(dashboard: str, http_port: int, route_prefix: str) -> tuple[dict, dict]:
    import aiohttp

    from kubeinfer.operator.serve_api import ServeApiClient
    async with aiohttp.ClientSession() as session:
        client = ServeApiClient(session, dashboard, http_port=http_port)
        return await client.details(), await client.autoscaling_decisions(route_prefix)


def _running_replicas(app_name: str) -> int:
    from ray import serve
    states = serve.status().applications[app_name].deployments["worker-tiny"].replica_states
    return states.get("RUNNING", 0)


async def _grpc_load(grpc_port: int, app_name: str, until) -> list[dict]:
    """Rounds of 8 concurrent streams through Serve's gRPC proxy until ``until()``; every result."""
    import grpc

    from kubeinfer.proto import inference_pb2_grpc as pb_grpc
    from tests.test_serve_e2e import grpc_stream
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = _Stub(pb_grpc.InferenceStub(channel), (("application", app_name),))
        while not until():
            results += await asyncio.gather(*(grpc_stream(stub, f"prompt {i}") for i in range(8)))
    return results


class _Stub:
    """The Inference stub with the Serve ``application`` metadata on every call."""

    def __init__(self, stub, metadata) -> None:
        self._stub, self._metadata = stub, metadata

    def GenerateStream(self, request, timeout=None):  # noqa: N802 (the proto's method name)
        return self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)


def test_status_and_event_follow_a_scale_change():
    from kubeinfer.operator.autoscaling_status import scale_change
    from kubeinfer.operator.spec import parse_spec
    spec = parse_spec(_md({"maxReplicas": 4, "policy": "kvCache"}))
    now = "2026-12-06T12:00:00Z"
    auto, event = scale_change(spec, {}, 1, now)
    assert auto == {"policy": "kvCache"} and event is None  # first observation: no Event
    auto, event = scale_change(spec, {"replicas": 2, "autoscaling": {"policy": "kvCache"}}, 3, now)
    assert auto == {"policy": "kvCache", "lastScale": "2 -> 3", "lastScaleTime": now}
    assert event == "kvCache: 2 -> 3 replicas (up)"
    assert scale_change(spec, {"replicas": 3, "autoscaling": auto}, 3, now) == (None, None)
    fixed = parse_spec(_md(None, replicas=2))
    assert scale_change(fixed, {"replicas": 1}, 2, now) == (None, None)


def test_a_policy_logs_each_change_of_mind_once(caplog):
    import logging
    c = Controller({"policy": "queue", "target_queue_length": 1}, max_replicas=4)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        c.run(10, num_requests_waiting=10, num_requests_running=4)
    lines = [r.getMessage() for r in caplog.records if "kubeinfer autoscaling" in r.getMessage()]
    assert 1 <= len(lines) <= 3 and "queue" in lines[0]  # 1 -> 2 -> 4, not one line per tick


def test_replicas_still_starting_are_not_asked_for_again():
    from kubeinfer.serve.autoscaling import decide
    ids = [ReplicaID(f"r{i}", DEP) for i in range(2)]

    def ctx(target):
        return SimpleNamespace(running_replicas=ids, target_num_replicas=target, policy_state={},
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10,
                               aggregated_metrics={WAITING: {r: 3.0 for r in ids}, RUNNING: {r: 2.0 for r in ids}},
                               raw_metrics={}, current_time=0.0, deployment_name="w")
    settings = PolicySettings(policy="queue", target_queue_length=2)  # load 1.5x: 2 reporting need 3
    assert decide(ctx(2), settings)[0] == 3
    assert decide(ctx(4), settings)[0] == 4  # 2 more already starting: hold, not 5


def test_a_burst_grows_the_target_while_replicas_still_start():
    """The step is bounded from the target, not from the replicas that report: while the first
    replicas still start, a burst that needs many more keeps raising the target a bounded step per
    decision (it was held at one doubling per replica start, and a burst outran the fleet)."""
    from kubeinfer.serve.autoscaling import decide
    ids = [ReplicaID("r0", DEP)]

    def ctx(target):
        return SimpleNamespace(running_replicas=ids, target_num_replicas=target, policy_state={},
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=40,
                               aggregated_metrics={WAITING: {ids[0]: 60.0}, RUNNING: {ids[0]: 16.0}},
                               raw_metrics={}, current_time=0.0, deployment_name="w")
    settings = PolicySettings(policy="queue", target_queue_length=2)  # 30x the target: 30 replicas
    assert decide(ctx(1), settings)[0] == 5     # HPA's rule: 4 more, or double, whichever is more
    assert decide(ctx(5), settings)[0] == 10    # 4 still starting: the target doubles all the same
    assert decide(ctx(20), settings)[0] == 30   # never past the need the reporting replica shows
    assert decide(ctx(30), settings)[0] == 30


def test_latency_capacity_comes_from_a_steady_comfortable_load_not_from_a_draining_backlog():
    """Replicas that hold 6 requests each with TTFT well under the SLO can hold 6: the fleet is not
    sized on the fallback's 2. As a backlog drains, TTFT (a window's percentile) still shows it
    while the replicas hold fewer requests each second: that is neither a capacity to learn nor an
    SLO breach to scale up for, and the fleet comes down."""
    from kubeinfer.serve.autoscaling import _CAPACITY_KEY
    c = Controller({"policy": "latency", "ttft_seconds": 2.0}, replicas=4)
    c.run(20, ttft_p90_s=0.5, num_requests_waiting=0, num_requests_running=6)
    assert set(c.history) == {4} and c.state[_CAPACITY_KEY] == pytest.approx(6)
    for i in range(ticks(30)):
        held = 6 - 0.09 * i
        c.tick(ttft_p90_s=1.8 if i < ticks(10) else 2.5, num_requests_waiting=0,
               num_requests_running=[held, held, held, 0])
    assert c.state[_CAPACITY_KEY] == pytest.approx(6)
    assert max(c.history) == 4 and c.target < 4


@pytest.mark.parametrize("policy", ["kvCache", "queue", "latency"])
def test_scale_from_zero_starts_a_replica_for_waiting_requests_and_never_strands_them(policy):
    """At 0 replicas with requests held in Serve's handles, each policy asks for a replica (directly
    and through Ray's wrapper); an idle replica goes to zero only when no request is counted."""
    from kubeinfer.serve.autoscaling import decide
    settings = PolicySettings(policy=policy)

    def ctx(replicas: int, target: int, requests: float):
        ids = [ReplicaID(f"r{i}", DEP) for i in range(replicas)]
        config = AutoscalingConfig(min_replicas=0, max_replicas=4, upscale_delay_s=0.0, downscale_delay_s=0.0,
                                   policy=ray_policy(settings))
        zero = {name: {r: 0.0 for r in ids} for name in (KV_CACHE_USAGE, WAITING, RUNNING, PREEMPTIONS_PER_S,
                                                            TTFT_P90_S)}
        return AutoscalingContext(
            deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=replicas,
            target_num_replicas=target, running_replicas=ids, total_num_requests=requests,
            total_queued_requests=requests if not replicas else 0.0, aggregated_metrics=zero, raw_metrics={},
            capacity_adjusted_min_replicas=0, capacity_adjusted_max_replicas=4, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=1000.0, config=config)

    wrapped = _apply_autoscaling_config(LLMAutoscalingPolicy(**settings.kwargs()))
    assert decide(ctx(0, 0, 3.0), settings)[0] == 1
    assert wrapped(ctx(0, 0, 3.0))[0] >= 1
    assert decide(ctx(0, 0, 0.0), settings)[0] == 0  # nothing waits: stay at zero
    assert decide(ctx(0, 1, 3.0), settings)[0] == 1  # one already starting: not asked for twice
    # One idle replica (its metrics all zero) while a request is counted (queued in a handle, or just
    # sent): it stays; with none counted it goes.
    assert decide(ctx(1, 1, 2.0), settings)[0] == 1
    assert decide(ctx(1, 1, 0.0), settings)[0] == 0


@pytest.mark.parametrize("policy", ["kvCache", "queue", "latency"])
def test_requests_queued_before_the_replicas_count_as_waiting(policy):
    """The router's admission queue (reported as a handle's queued requests) and Serve's handle
    queue reach the policies as total_queued_requests: idle-looking replicas with 6 requests held in
    front of them scale up; without them they hold."""
    from kubeinfer.serve.autoscaling import decide
    ids = [ReplicaID("r0", DEP)]

    def ctx(queued: float):
        metrics = {KV_CACHE_USAGE: {ids[0]: 0.3}, WAITING: {ids[0]: 0.0}, RUNNING: {ids[0]: 1.0},
                   TTFT_P90_S: {ids[0]: 0.5}, PREEMPTIONS_PER_S: {ids[0]: 0.0}}
        return SimpleNamespace(running_replicas=ids, target_num_replicas=1, policy_state={},
                               capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
                               aggregated_metrics=metrics, raw_metrics={}, current_time=0.0, deployment_name="w",
                               total_num_requests=1.0 + queued, total_queued_requests=queued,
                               config=SimpleNamespace(target_ongoing_requests=2.0))
    settings = PolicySettings(policy=policy, target_queue_length=2)
    assert decide(ctx(0.0), settings)[0] == 1
    # Sized by the queue: 6 waiting against 2 per replica is 3 replicas' worth (latency: 7 held
    # against the fallback's 2 per replica, 4).
    assert decide(ctx(6.0), settings)[0] == {"kvCache": 3, "queue": 3, "latency": 4}[policy]


def test_the_router_queue_report_has_serves_handle_report_shape():
    from ray.serve._private.common import DeploymentHandleSource, HandleMetricReport

    from kubeinfer.serve.ingress import RouterQueueReporter
    router = SimpleNamespace(queued_by_model={"m": 3})
    reporter = RouterQueueReporter(router, {"m": (DEP, 2.0)}, 0.5, actor_id="actor-1")
    first = reporter.report("m", 100.0)
    router.queued_by_model["m"] = 5
    later = reporter.report("m", 101.0)
    assert isinstance(later, HandleMetricReport) and later.deployment_id == DEP
    assert later.actor_id == "actor-1" and later.handle_source is DeploymentHandleSource.REPLICA
    assert later.handle_id == first.handle_id  # one series per model, replaced by each push
    assert [(p.timestamp, p.value) for p in later.queued_requests] == [(100.0, 3.0), (101.0, 5.0)]
    assert [p.value for p in reporter.report("m", 103.5).queued_requests] == [5.0, 5.0]  # the look-back prunes


def test_the_router_admission_queue_scales_a_real_deployment(ray_head, tiny_llama_dir):
    """The router lets one request at a time reach the replica (max_in_flight 1), so the engine
    never has a waiting request and the replica-side signals read one running: only the router's
    admission queue, reported to Serve's autoscaler, shows the load. The queue policy sees it and
    adds a replica; every request completes."""
    import time

    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from kubeinfer.serve.app import build_app
    from kubeinfer.serve.config import GRPC_SERVICER_FUNCTIONS, AppConfig, ModelSpec, RouterSettings
    from tests.conftest import free_port

    app_name = "kubeinfer-router-queue"
    ray.init(address=ray_head["address"], log_to_driver=False)
    serve.shutdown()
    grpc_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    auto = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "upscale_delay_s": 0.5,
            "downscale_delay_s": 30.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0,
            "policy": ray_policy(PolicySettings(policy="queue", target_queue_length=2))}
    app = AppConfig(models=[ModelSpec(name="tiny", uri=tiny_llama_dir, max_model_len=256,
                                      engine={"num_kv_blocks": 160, "max_num_seqs": 4}, autoscaling=auto)],
                    router=RouterSettings(max_in_flight=1, max_queued=32, max_queue_wait_s=120.0))

    def running() -> int:
        return _running_replicas(app_name)

    try:
        serve.run(build_app(app.to_dict()), name=app_name, route_prefix="/queue")
        assert running() == 1
        deadline = time.monotonic() + 60
        results = asyncio.run(_grpc_load(grpc_port, app_name, lambda: running() >= 2 or time.monotonic() > deadline))
        assert running() == 2, "the router's queue did not scale the deployment up"
        assert results and all(r["error"] is None and len(r["tokens"]) == 64 for r in results)
    finally:
        serve.shutdown()
        ray.shutdown()
