"""The kubeinfer.v1.Inference gRPC service over a Router, and the proto <-> router conversions that
the Ray Serve ingress shares."""

from __future__ import annotations

from typing import Any, AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.router import Router
from kubeinfer.router.types import Chunk, Code, RouterError

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "logprobs")
GRPC_CODES = {c: getattr(grpc.StatusCode, c.name) for c in Code}
RETRY_AFTER_KEY = "retry-after-s"


def prepare_kwargs(req: pb.GenerateRequest) -> dict[str, Any]:
    """``Router.prepare`` keyword arguments from a GenerateRequest."""
    s = req.sampling
    sampling: dict[str, Any] = {f: getattr(s, f) for f in _SAMPLING_FIELDS if s.HasField(f)}
    sampling.update(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                    include_stop_str_in_output=s.include_stop_str_in_output)
    kwargs: dict[str, Any] = {"model": req.model or None, "sampling": sampling,
                              "request_id": req.request_id or None, "priority": req.priority}
    which = req.WhichOneof("input")
    if which == "prompt":
        kwargs["prompt"] = req.prompt
    elif which == "prompt_token_ids":
        kwargs["prompt_token_ids"] = list(req.prompt_token_ids.ids)
    elif which == "chat":
        kwargs["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
    return kwargs


def _logprobs(chunk: Chunk) -> list[pb.TokenLogprob]:
    if not chunk.logprobs:
        return []
    out = []
    for token, top in zip(chunk.token_ids, chunk.logprobs):
        out.append(pb.TokenLogprob(token_id=token, logprob=top.get(token, 0.0), top_logprobs=top))
    return out


def _usage(chunk: Chunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                    cached_prompt_tokens=chunk.cached_tokens)


def stream_response(chunk: Chunk, model: str) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=chunk.request_id, model=model, text=chunk.text,
                                    token_ids=chunk.token_ids, logprobs=_logprobs(chunk))
    if chunk.finished:
        msg.finish_reason = chunk.finish_reason
        msg.usage.CopyFrom(_usage(chunk))
    return msg


def unary_response(chunks: list[Chunk], model: str) -> pb.GenerateResponse:
    last = chunks[-1]
    return pb.GenerateResponse(
        request_id=last.request_id, model=model, text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids], finish_reason=last.finish_reason or "",
        usage=_usage(last), logprobs=[lp for c in chunks for lp in _logprobs(c)])


def list_models_response(router: Router) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelInfo(id=m.name, uri=m.uri, quantization=m.quantization or "", max_model_len=m.max_model_len)
        for m in router.models.values()])


def timeout_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e9 else None


def _parse(message_type, data: bytes | Any):
    """A request message from its bytes; bytes that do not parse are the client's error."""
    if not isinstance(data, (bytes, bytearray)):
        return data
    try:
        return message_type.FromString(data)
    except DecodeError:
        raise RouterError(Code.INVALID_ARGUMENT, f"the request is not a valid {message_type.DESCRIPTOR.full_name} "
                                                 "message") from None


class InferenceServicer(pb_grpc.InferenceServicer):
    """Serves kubeinfer.v1.Inference from a Router; owns nothing else. Router errors become gRPC
    statuses with the router's message (and a ``retry-after-s`` trailer when overloaded).

    Its methods take parsed messages or, as ``start_grpc_server`` registers them, raw bytes, so
    bytes that are no message get INVALID_ARGUMENT instead of the library's UNKNOWN.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    async def Generate(self, request: pb.GenerateRequest | bytes,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        try:
            request = _parse(pb.GenerateRequest, request)
            job = await self.router.aprepare(**prepare_kwargs(request))
            chunks = [c async for c in self.router.stream(job, timeout_s=timeout_of(context))]
        except RouterError as e:
            await _abort(context, e)
        return unary_response(chunks, job.model)

    async def GenerateStream(self, request: pb.GenerateRequest | bytes,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            request = _parse(pb.GenerateRequest, request)
            job = await self.router.aprepare(**prepare_kwargs(request))
            async for chunk in self.router.stream(job, timeout_s=timeout_of(context)):
                yield stream_response(chunk, job.model)
        except RouterError as e:
            await _abort(context, e)

    async def ListModels(self, request: pb.ListModelsRequest | bytes,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            _parse(pb.ListModelsRequest, request)
        except RouterError as e:
            await _abort(context, e)
        return list_models_response(self.router)


def _raw_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The Inference service with requests handed over as bytes (see InferenceServicer)."""
    out = lambda m: m.SerializeToString()  # noqa: E731
    return grpc.method_handlers_generic_handler("kubeinfer.v1.Inference", {
        "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate, response_serializer=out),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(servicer.GenerateStream, response_serializer=out),
        "ListModels": grpc.unary_unary_rpc_method_handler(servicer.ListModels, response_serializer=out),
    })


class RouterHealth(health_aio.HealthServicer):
    """grpc.health.v1 for the router: NOT_FOUND for a service not served here; NOT_SERVING while
    draining or while a model has no live replica (as far as the pools can tell)."""

    SERVICES = ("", "kubeinfer.v1.Inference")

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router

    async def Check(self, request, context):
        if request.service not in self.SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"
                                .encode("utf-8", "backslashreplace").decode("utf-8"))
        serving = not self.router.draining and not self.router.unready_models()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)


async def _abort(context: grpc.aio.ServicerContext, e: RouterError) -> None:
    trailers = ((RETRY_AFTER_KEY, f"{e.retry_after_s:.3f}"),) if e.retry_after_s is not None else ()
    message = e.message.encode("utf-8", "backslashreplace").decode("utf-8")
    await context.abort(GRPC_CODES[e.code], message, trailing_metadata=trailers)


MIN_MESSAGE_BYTES = 16 << 20  # so a prompt over the character limit gets the router's own answer


async def start_grpc_server(router: Router, address: str = "127.0.0.1:9000") -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with the Inference and standard Health services; returns it and its port.

    Messages larger than ``max(router.max_body_bytes, MIN_MESSAGE_BYTES)`` are refused by gRPC itself
    (RESOURCE_EXHAUSTED) before they are read.
    """
    limit = max(router.max_body_bytes, MIN_MESSAGE_BYTES)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    server.add_generic_rpc_handlers((_raw_handlers(InferenceServicer(router)),))
    health = RouterHealth(router)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for service in ("", "kubeinfer.v1.Inference"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port
