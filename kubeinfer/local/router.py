"""An in-process serving stack: engines, pools and a router in one process, without Ray.

Used by tests, by benchmarks that measure the router against the engine, and by anyone embedding
the router in a program of their own.
"""

from __future__ import annotations

from kubeinfer.router.policies import make_policy
from kubeinfer.local.pool import LocalPool
from kubeinfer.local.replica import EngineReplica
from kubeinfer.router.router import Router
from kubeinfer.router.served_model import ServedModel
from kubeinfer.serve.config import AppConfig, ModelSpec
from kubeinfer.worker import Engine, EngineConfig
from kubeinfer.worker.async_engine import AsyncEngine


def build_served_model(spec: ModelSpec, policy: str, num_replicas: int | None = None) -> ServedModel:
    """Load ``num_replicas`` engines (default: the spec's) for one model behind a LocalPool."""
    n = num_replicas if num_replicas is not None else (spec.num_replicas or 1)
    engines = [Engine(EngineConfig(**spec.engine_kwargs())) for _ in range(n)]
    replicas = [EngineReplica(AsyncEngine(e), f"{spec.name}-{i}") for i, e in enumerate(engines)]
    first = engines[0]
    return ServedModel(spec.name, first.tokenizer, first.max_model_len, first.model_config.vocab_size,
                       LocalPool(replicas, make_policy(policy)), uri=spec.uri, quantization=spec.quantization)


def build_local_router(app: AppConfig) -> Router:
    return Router([build_served_model(m, app.router.policy) for m in app.models], app.router)


def shutdown_local_router(router: Router) -> None:
    for served in router.models.values():
        served.pool.shutdown()
