"""The kubeinfer.v1.Inference gRPC service over a Router (one servicer, for the router's own server
and the Ray Serve ingress alike) and the proto <-> router conversions."""

from __future__ import annotations

from typing import Any, AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.parallel import check_n, expand, stream_choices
from kubeinfer.router.router import Router
from kubeinfer.router.types import RETRY_AFTER_KEY, Chunk, Code, RouterError, with_retry_hint

_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "logprobs")
GRPC_CODES = {c: getattr(grpc.StatusCode, c.name) for c in Code}


def prepare_kwargs(req: pb.GenerateRequest) -> dict[str, Any]:
    """``Router.prepare`` keyword arguments from a GenerateRequest."""
    s = req.sampling
    sampling: dict[str, Any] = {f: getattr(s, f) for f in _SAMPLING_FIELDS if s.HasField(f)}
    sampling.update(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                    include_stop_str_in_output=s.include_stop_str_in_output)
    if s.HasField("structured_output"):
        sampling["structured_output"] = _structured_output(s.structured_output)
    if s.logit_bias:
        sampling["logit_bias"] = dict(s.logit_bias)
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


def _structured_output(so: pb.StructuredOutput) -> dict[str, Any]:
    """``StructuredOutputParams`` keyword arguments; an unset oneof is left for the router to refuse."""
    kind = so.WhichOneof("kind")
    if kind == "json_schema":
        return {"json": so.json_schema}
    if kind == "choice":
        return {"choice": list(so.choice.choices)}
    if kind == "json_object":
        return {"json_object": so.json_object}
    return {kind: getattr(so, kind)} if kind else {}


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


def stream_response(chunk: Chunk, model: str, request_id: str, index: int = 0) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=request_id, model=model, text=chunk.text, index=index,
                                    token_ids=chunk.token_ids, logprobs=_logprobs(chunk))
    if chunk.finished:
        msg.finish_reason = chunk.finish_reason
        msg.usage.CopyFrom(_usage(chunk))
    return msg


def unary_response(items: list[tuple[int, Chunk]], model: str, request_id: str) -> pb.GenerateResponse:
    """The response for a request's ``(index, chunk)`` pairs: every choice, choice 0's at the top,
    the prompt counted once in the usage."""
    per_choice: dict[int, list[Chunk]] = {}
    for index, chunk in items:
        per_choice.setdefault(index, []).append(chunk)
    choices = [pb.Choice(index=i, text="".join(c.text for c in chunks),
                         token_ids=[t for c in chunks for t in c.token_ids],
                         finish_reason=chunks[-1].finish_reason or "",
                         logprobs=[lp for c in chunks for lp in _logprobs(c)])
               for i, chunks in sorted(per_choice.items())]
    lasts = [chunks[-1] for _, chunks in sorted(per_choice.items())]
    usage = _usage(lasts[0])
    usage.completion_tokens = sum(c.completion_tokens for c in lasts)
    first = choices[0]
    return pb.GenerateResponse(request_id=request_id, model=model, text=first.text, token_ids=first.token_ids,
                               finish_reason=first.finish_reason, usage=usage, logprobs=first.logprobs,
                               choices=choices)


def list_models_response(router: Router) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[
        pb.ModelInfo(id=m.name, uri=m.uri, quantization=m.quantization or "", max_model_len=m.max_model_len)
        for m in router.models.values()])


def timeout_of(context) -> float | None:
    """The client's deadline, where the transport tells it (Serve's context does not)."""
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
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


def client_message(e: RouterError) -> str:
    """The status details a client reads: the router's message, valid Unicode, with the retry hint
    spelled out (a transport may lose the trailer: Serve's proxy drops it from a failed stream)."""
    message = with_retry_hint(e.message, e.retry_after_s)
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _trailers(e: RouterError) -> tuple[tuple[str, str], ...]:
    return ((RETRY_AFTER_KEY, f"{e.retry_after_s:.3f}"),) if e.retry_after_s is not None else ()


async def abort_aio(context: grpc.aio.ServicerContext, e: RouterError, *, streaming: bool) -> None:
    """A grpc.aio server's answer to a RouterError: abort with its status, message and trailer."""
    await context.abort(GRPC_CODES[e.code], client_message(e), trailing_metadata=_trailers(e))


class ServeStatusError(Exception):
    """Raised from a failed stream on Ray Serve: Serve sends the code and details set on its
    context when the method raises."""


async def fail_on_serve_context(context, e: RouterError, *, streaming: bool) -> None:
    """Ray Serve's gRPC proxy applies the code, details and trailers set on its context when a
    unary method returns, so a unary call sets them and returns (its caller then returns an empty
    message, which the client never sees behind the error status). A stream that fails before its
    first message can only raise: Serve keeps the code and details, and drops the trailer."""
    context.set_code(GRPC_CODES[e.code])
    context.set_details(client_message(e))
    if e.retry_after_s is not None:
        context.set_trailing_metadata(list(_trailers(e)))
    if streaming:
        raise ServeStatusError(client_message(e))


def health_response(router: Router, service: str) -> health_pb2.HealthCheckResponse:
    """grpc.health.v1's answer for ``service``: NOT_FOUND (a RouterError) for a service not served
    here; NOT_SERVING while draining or while a model has no live replica (as far as the pools can
    tell); else SERVING."""
    if service not in HEALTH_SERVICES:
        raise RouterError(Code.NOT_FOUND, f"unknown service {service!r}")
    serving = not router.draining and not router.unready_models()
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving
                                          else health_pb2.HealthCheckResponse.NOT_SERVING)


HEALTH_SERVICES = ("", "kubeinfer.v1.Inference")


class InferenceServicer(pb_grpc.InferenceServicer):
    """The one implementation of kubeinfer.v1.Inference (and grpc.health.v1's Check) over a Router,
    for every transport: the router's own grpc.aio server and the Ray Serve ingress. Owns nothing
    but the router reference and ``fail``, the transport's way to answer a RouterError (``abort_aio``
    or ``fail_on_serve_context``), chosen when it is built.

    Its methods take parsed messages or, as ``start_grpc_server`` registers them, raw bytes, so
    bytes that are no message get INVALID_ARGUMENT instead of the library's UNKNOWN. Every client
    error is a RouterError, so a status is never UNKNOWN or INTERNAL for bad input.
    """

    def __init__(self, router: Router, fail=abort_aio) -> None:
        self.router = router
        self._fail = fail

    async def Generate(self, request: pb.GenerateRequest | bytes, context) -> pb.GenerateResponse:
        try:
            request = _parse(pb.GenerateRequest, request)
            n = check_n(request.n or 1, self.router.settings)
            job = await self.router.aprepare(**prepare_kwargs(request))  # tokenizes off the event loop
            items = [item async for item in stream_choices(self.router, expand(job, n), timeout_s=timeout_of(context))]
        except RouterError as e:
            await self._fail(context, e, streaming=False)
            return pb.GenerateResponse()
        return unary_response(items, job.model, job.request_id)

    async def GenerateStream(self, request: pb.GenerateRequest | bytes,
                             context) -> AsyncIterator[pb.GenerateStreamResponse]:
        try:
            request = _parse(pb.GenerateRequest, request)
            n = check_n(request.n or 1, self.router.settings)
            job = await self.router.aprepare(**prepare_kwargs(request))
            async for index, chunk in stream_choices(self.router, expand(job, n), timeout_s=timeout_of(context)):
                yield stream_response(chunk, job.model, job.request_id, index)
        except RouterError as e:
            await self._fail(context, e, streaming=True)

    async def ListModels(self, request: pb.ListModelsRequest | bytes, context) -> pb.ListModelsResponse:
        try:
            _parse(pb.ListModelsRequest, request)
        except RouterError as e:
            await self._fail(context, e, streaming=False)
            return pb.ListModelsResponse()
        return list_models_response(self.router)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        try:
            return health_response(self.router, request.service)
        except RouterError as e:
            await self._fail(context, e, streaming=False)
            return health_pb2.HealthCheckResponse()


def _raw_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The Inference service with requests handed over as bytes (see InferenceServicer)."""
    out = lambda m: m.SerializeToString()  # noqa: E731
    return grpc.method_handlers_generic_handler("kubeinfer.v1.Inference", {
        "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate, response_serializer=out),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(servicer.GenerateStream, response_serializer=out),
        "ListModels": grpc.unary_unary_rpc_method_handler(servicer.ListModels, response_serializer=out),
    })


def _health_handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """grpc.health.v1's Check, answered by the servicer's own (as on Ray Serve, which routes Check to
    the ingress): one health implementation, whose answer follows the router's state at each call.
    Watch is not offered (UNIMPLEMENTED); Kubernetes' gRPC probes and load balancers call Check."""
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    })


MIN_MESSAGE_BYTES = 16 << 20  # so a prompt over the character limit gets the router's own answer


async def start_grpc_server(router: Router, address: str = "127.0.0.1:9000") -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with the Inference and standard Health services; returns it and its port.

    Messages larger than ``max(router.max_body_bytes, MIN_MESSAGE_BYTES)`` are refused by gRPC itself
    (RESOURCE_EXHAUSTED) before they are read.
    """
    limit = max(router.max_body_bytes, MIN_MESSAGE_BYTES)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
    servicer = InferenceServicer(router)
    server.add_generic_rpc_handlers((_raw_handlers(servicer), _health_handlers(servicer)))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
