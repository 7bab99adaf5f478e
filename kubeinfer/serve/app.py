"""The Serve application builder: ``import_path: kubeinfer.serve.app:build_app`` with
``AppConfig.to_dict()`` as ``args`` (what `kubeinfer serve` and the operator deploy)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from kubeinfer.serve.config import AppConfig, ModelSpec
from kubeinfer.serve.ingress import RouterIngress
from kubeinfer.serve.request_router import PolicyRequestRouter
from kubeinfer.serve.worker import Worker

ROUTING_STATS_PERIOD_S = 2.0
# Backpressure is the router's (its bounded admission queue), not Serve's: with a Serve limit near
# the router's in-flight bound, a replica winding down a mass disconnect looks full, Serve probes it
# with backoff, and the abort and report calls the router pins to it wait behind the probes.
WORKER_MAX_ONGOING_REQUESTS = 4096


def worker_options(spec: ModelSpec, policy: str) -> dict[str, Any]:
    """The Worker deployment's Serve options for one model (replicas or autoscaling passed through)."""
    options: dict[str, Any] = {
        "name": f"worker-{spec.name}",
        "max_ongoing_requests": WORKER_MAX_ONGOING_REQUESTS,
        "ray_actor_options": dict(spec.ray_actor_options) or {"num_cpus": 1},
        "request_router_config": RequestRouterConfig(
            request_router_class=PolicyRequestRouter, request_router_kwargs={"policy": policy},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
    }
    if spec.autoscaling is not None:
        # A ``policy`` (kubeinfer's LLM policy with its kwargs) goes to Ray as given; without one Ray
        # keeps its default policy on ongoing requests. Ray wraps either in its delays and bounds.
        options["autoscaling_config"] = {k: v for k, v in spec.autoscaling.items()
                                         if k != "policy" or v is not None}
    else:
        options["num_replicas"] = spec.num_replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    app = AppConfig.from_dict(args)
    for model in app.models:
        # A device its Ray reservation cannot give fails the deploy once, here, with that message,
        # instead of every replica failing to start.
        model.replica_engine_kwargs()
    workers = {m.name: Worker.options(**worker_options(m, app.router.policy)).bind(asdict(m))
               for m in app.models}
    # The router is I/O-bound: it takes no CPU reservation, so it fits next to the workers.
    return RouterIngress.options(name="router", num_replicas=app.router.num_replicas,
                                 ray_actor_options={"num_cpus": 0}).bind(app.to_dict(), workers)
