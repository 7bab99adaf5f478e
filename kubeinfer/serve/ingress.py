"""The Router ingress deployment: our gRPC service (through Serve's gRPC proxy) and the OpenAI
HTTP surface (through Serve's HTTP proxy) over one Router whose pools call the Worker deployments."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from typing import Any, AsyncIterator, Iterator

from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import context as serve_context
from ray.serve.handle import DeploymentHandle

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.router.grpc_service import InferenceServicer, fail_on_serve_context
from kubeinfer.router.pool import WorkerPool
from kubeinfer.router.types import StreamItem
from kubeinfer.router.router import Router
from kubeinfer.router.served_model import DEFAULT_SEQS_PER_REPLICA, ServedModel
from kubeinfer.router.types import GenerateJob, ReplicaReport
from kubeinfer.serve.autoscaling import DECISIONS_PATH, read_decisions
from kubeinfer.serve.config import AppConfig

log = logging.getLogger(__name__)
# How often the router's admission queue is reported to Serve's autoscaler (at most; a deployment's
# shorter metrics_interval_s wins).
QUEUE_REPORT_INTERVAL_S = 1.0


@contextlib.contextmanager
def own_internal_request_id() -> Iterator[None]:
    """Handle calls made inside get an internal request id of their own (the request id, shown in
    logs, stays the caller's).

    Serve's request router hands a routed replica to the pending call with that internal id, and
    every call made while serving one ingress request inherits the request's: when two of them wait
    for a replica at once (a retry beside a report refresh, or the calls of one micro-batch flush,
    while a killed replica held routing up) the second was never indexed and waited for ever."""
    current = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(
        dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


class ServePool(WorkerPool):
    """A model's Worker deployment behind a Serve handle. The replica for each call is picked by
    Serve's request router (``PolicyRequestRouter``), so this pool only sends and aborts."""

    def __init__(self, handle: DeploymentHandle) -> None:
        super().__init__()
        self.stream_handle = handle.options(stream=True)
        self.handle = handle

    async def _call(self, jobs: list[GenerateJob], exclude: str | None) -> AsyncIterator[StreamItem]:
        with own_internal_request_id():
            response = self.stream_handle.generate_batch.remote(jobs, exclude_replica=exclude)
        ended = False
        try:
            async for item in response:
                yield item
            ended = True
        finally:
            if not ended:
                # A call closed early is cancelled explicitly: a cancelled wait on a Serve response
                # only stops the waiting, and a call not yet assigned to a replica then still runs
                # there to its end with nobody reading it (seen after 300 clients left at once).
                response.cancel()

    async def abort(self, replica_id: str, request_id: str) -> None:
        try:
            with own_internal_request_id():
                response = self.handle.abort.remote(request_id, pin_replica=replica_id)
            await response
        except Exception as e:  # the replica is gone, and the request with it
            log.info("abort of %s on %s failed: %s", request_id, replica_id, e)

    async def refresh_report(self, replica_id: str) -> ReplicaReport | None:
        # Pinned like an abort, so the answer is that replica's; the request router counts it as a
        # call, but it returns at once.
        with own_internal_request_id():
            response = self.handle.report.remote(pin_replica=replica_id)
        return await response


class RouterQueueReporter:
    """Reports each autoscaled model's requests waiting in this router's admission queue to Serve's
    controller as the queued requests of a handle of the model's Worker deployment (the shape and
    call Serve's own handles use), so the deployment's autoscaling context counts them: Ray's
    default policy in ``total_num_requests``, kubeinfer's policies in ``total_queued_requests``.
    Replica-side signals miss them: a request the router holds has reached no replica.

    Owns one time series per model over the look-back window (Serve aggregates the series of all
    handles over it), pushed every ``interval_s``; Serve drops a handle's series when this replica
    dies or stops pushing. Uses Ray Serve 2.60's private HandleMetricReport: a failed push is
    logged once and retried, never raised into serving."""

    def __init__(self, router: Router, deployments: dict[str, tuple[Any, float]], interval_s: float,
                 actor_id: str | None = None) -> None:
        self.router = router
        self.deployments = deployments  # model -> (its Worker DeploymentID, look_back_period_s)
        self.interval_s = interval_s
        if actor_id is None:  # this replica's actor: Serve drops the series as soon as it dies
            import ray
            actor_id = ray.get_runtime_context().get_actor_id()
        self.actor_id = actor_id
        self.handle_id = f"kubeinfer-router-queue-{uuid.uuid4().hex[:12]}"
        self.series: dict[str, list] = {model: [] for model in deployments}
        self.failed = False

    def report(self, model: str, now: float):
        """The HandleMetricReport for ``model`` at ``now`` (time.time()), its series updated."""
        from ray.serve._private.common import DeploymentHandleSource, HandleMetricReport, TimeStampedValue
        deployment_id, look_back_s = self.deployments[model]
        # The look-back window, and the point before it (its value held into the window: Serve opens
        # the window of a sum at the latest first point of its series).
        old = self.series[model]
        keep = next((i for i, p in enumerate(old) if p.timestamp >= now - look_back_s), len(old))
        series = old[max(0, keep - 1):]
        series.append(TimeStampedValue(now, float(self.router.queued_by_model.get(model, 0))))
        self.series[model] = series
        return HandleMetricReport(deployment_id=deployment_id, handle_id=f"{self.handle_id}-{model}",
                                  actor_id=self.actor_id, handle_source=DeploymentHandleSource.REPLICA,
                                  queued_requests=list(series), metrics={}, timestamp=now)

    async def run(self) -> None:
        import time

        from ray.serve.context import _get_global_client
        while True:
            try:
                controller = _get_global_client()._controller
                for model in self.deployments:
                    await controller.record_autoscaling_metrics_from_handle.remote(self.report(model, time.time()))
            except Exception as e:  # never into serving: the replica-side signals still work
                if not self.failed:
                    log.warning("cannot report the router's queue to Serve's autoscaler: %s", e)
                self.failed = True
            await asyncio.sleep(self.interval_s)


@serve.deployment(max_ongoing_requests=4096, graceful_shutdown_timeout_s=60)
@serve.ingress()
class RouterIngress:
    """Owns the Router (admission, batching, metrics) of one application replica; every served
    model's tokenizer is loaded here so the workers never tokenize. gRPC methods have the proto's
    names because Serve's gRPC proxy calls the ingress method of the same name."""

    def __init__(self, args: dict[str, Any], workers: dict[str, DeploymentHandle]) -> None:
        from kubeinfer.worker.models.loader import load_model_info
        app = AppConfig.from_dict(args)
        models = []
        for spec in app.models:
            config, tokenizer = load_model_info(spec.uri)
            max_len = spec.max_model_len or config.max_position_embeddings
            # The admission queue is sized from what the replicas run at once (the most replicas
            # autoscaling may start): Serve hides the replicas from the pool.
            replicas = spec.num_replicas or (spec.autoscaling or {}).get("max_replicas") or 1
            capacity = int(spec.engine.get("max_num_seqs", DEFAULT_SEQS_PER_REPLICA)) * max(1, int(replicas))
            models.append(ServedModel(spec.name, tokenizer, max_len, config.vocab_size,
                                      ServePool(workers[spec.name]), uri=spec.uri, quantization=spec.quantization,
                                      capacity=capacity))
        self.router = Router(models, app.router)
        self.grpc = InferenceServicer(self.router, fail=fail_on_serve_context)
        # Each model's Worker deployment whose scale decisions our policy publishes (not Ray's default).
        self._decided = {spec.name: workers[spec.name].deployment_id for spec in app.models
                         if (spec.autoscaling or {}).get("policy")}
        autoscaled = {spec.name: (workers[spec.name].deployment_id,
                                  float(spec.autoscaling.get("look_back_period_s") or 30.0))
                      for spec in app.models if spec.autoscaling is not None}
        self._queue_reporter = None
        if autoscaled:
            interval = min(QUEUE_REPORT_INTERVAL_S, *(float(s.autoscaling.get("metrics_interval_s") or 10.0)
                                                       for s in app.models if s.autoscaling is not None))
            try:  # Serve runs the constructor on the replica's event loop
                self._queue_reporter = asyncio.get_running_loop().create_task(
                    RouterQueueReporter(self.router, autoscaled, interval).run())
            except RuntimeError:
                log.warning("no event loop: the router's queue is not reported to Serve's autoscaler")

    def __serve_build_asgi_app__(self):
        from kubeinfer.router.http_api import build_http_app
        app = build_http_app(self.router)
        app.add_api_route(DECISIONS_PATH, self.autoscaling_decisions, methods=["GET"], include_in_schema=False)
        return app

    async def autoscaling_decisions(self) -> dict[str, Any]:
        """``{"models": {name: [recent decisions, oldest first]}}`` for the models our policy scales
        (the CR's status reads it: Serve's REST API does not carry a policy's reasons)."""
        return {"models": {name: await asyncio.to_thread(read_decisions, dep.app_name, dep.name)
                           for name, dep in self._decided.items()}}

    # Serve's gRPC proxy calls the ingress method named like the RPC; each hands over to the one
    # servicer (the router's own gRPC server runs the same one), bound to Serve's context.
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        return await self.grpc.Generate(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for message in self.grpc.GenerateStream(request, grpc_context):
            yield message

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        return await self.grpc.ListModels(request, grpc_context)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        return await self.grpc.Check(request, grpc_context)

    async def __del__(self) -> None:
        # Serve stops routing to a replica before deleting it; finish what is in flight.
        await self.router.drain(timeout_s=30.0)
        if self._queue_reporter is not None:
            self._queue_reporter.cancel()
        await self.router.aclose()

