"""The Router ingress deployment: our gRPC service (through Serve's gRPC proxy) and the OpenAI
HTTP surface (through Serve's HTTP proxy) over one Router whose pools call the Worker deployments."""

from __future__ import annotations

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
from kubeinfer.router.router import DEFAULT_SEQS_PER_REPLICA, Router, ServedModel
from kubeinfer.router.types import GenerateJob, ReplicaReport
from kubeinfer.serve.config import AppConfig

log = logging.getLogger(__name__)


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

    def __serve_build_asgi_app__(self):
        from kubeinfer.router.http_api import build_http_app
        return build_http_app(self.router)

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
        await self.router.aclose()

