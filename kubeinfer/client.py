"""A small client for programs: the kubeinfer.v1.Inference gRPC service, sync and asyncio.

    from kubeinfer.client import Client
    with Client("127.0.0.1:9000") as c:
        print(c.generate("The capital of France is", max_tokens=16, temperature=0).text)
        for delta in c.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="", flush=True)

Errors: every failed call raises :class:`ServerError` (never a raw ``grpc.RpcError``), carrying the
gRPC status code, the server's message and, for RESOURCE_EXHAUSTED, the ``retry-after-s`` hint.
A sampling argument left as None is not sent, so the server's default applies (vLLM's defaults:
max_tokens 16, temperature 1.0, top_p 1.0, top_k off).

Imports neither torch nor the router, so a program that only talks to a server stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.types import RETRY_AFTER_KEY, retry_hint_of  # plain data: no torch, no gRPC server

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "logprobs")


class ServerError(Exception):
    """A call that failed: ``code`` is the ``grpc.StatusCode``, ``message`` the server's text and
    ``retry_after_s`` the server's retry hint (RESOURCE_EXHAUSTED), else None."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> ServerError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        message = (e.details() if hasattr(e, "details") else None) or str(e)
        retry_after = None
        trailers = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == RETRY_AFTER_KEY:
                try:
                    retry_after = float(value)
                except ValueError:  # a malformed hint is no hint
                    pass
        if retry_after is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after = retry_hint_of(message)  # a transport that dropped the trailer (Serve's, on a stream)
        return cls(code, message, retry_after)


@dataclass
class Usage:
    """Token counts of one request; ``cached_prompt_tokens`` came from the server's prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @classmethod
    def from_pb(cls, u: pb.Usage) -> Usage:
        return cls(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


@dataclass
class Choice:
    """One of a request's ``n`` choices."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class Completion:
    """A whole completion: the text, its token ids, why it ended (stop | length | abort) and usage
    (the prompt counted once, every choice's tokens summed). ``choices`` holds all ``n`` choices in
    index order; ``text``, ``token_ids`` and ``finish_reason`` are choice 0's."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    request_id: str = ""
    model: str = ""
    choices: list[Choice] = field(default_factory=list)


@dataclass
class StreamDelta:
    """What one streamed message added to choice ``index`` (with ``n`` > 1 the choices' messages
    interleave). ``finish_reason`` and ``usage`` are set on each choice's last one only."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""
    model: str = ""
    index: int = 0

    @classmethod
    def from_pb(cls, m: pb.GenerateStreamResponse) -> StreamDelta:
        last = bool(m.finish_reason)
        return cls(m.text, list(m.token_ids), m.finish_reason or None,
                   Usage.from_pb(m.usage) if last else None, m.request_id, m.model, m.index)


@dataclass
class ModelInfo:
    """A served model as ListModels describes it (``quantization`` empty when unquantized)."""

    id: str
    uri: str
    quantization: str
    max_model_len: int


def build_request(prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
                  prompt_token_ids: Sequence[int] | None = None, model: str = "",
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, min_p: float | None = None,
                  repetition_penalty: float | None = None, presence_penalty: float | None = None,
                  frequency_penalty: float | None = None, seed: int | None = None,
                  stop: Sequence[str] | str = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  logprobs: int | None = None, include_stop_str_in_output: bool = False,
                  request_id: str = "", priority: int = 0, guided_json: dict | str | None = None,
                  guided_regex: str | None = None, guided_choice: Sequence[str] | None = None,
                  guided_grammar: str | None = None, json_object: bool = False, n: int = 1,
                  logit_bias: dict[int, float] | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from plain arguments; exactly one of prompt, messages, prompt_token_ids.
    ``n`` choices are sampled from the prompt (with a seed s, choice i uses s + i).

    At most one structured-output constraint, with vLLM's names: ``guided_json`` (a JSON schema, as
    a dict or JSON text), ``guided_regex``, ``guided_choice``, ``guided_grammar`` (EBNF), or
    ``json_object=True`` (any JSON object). ``logit_bias`` maps token ids to values in [-100, 100]
    added to their logits (OpenAI's)."""
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or prompt_token_ids")
    constraints = {"json_schema": guided_json if guided_json is None or isinstance(guided_json, str)
                   else json.dumps(guided_json),
                   "regex": guided_regex, "grammar": guided_grammar,
                   "choice": None if guided_choice is None else pb.Choices(choices=list(guided_choice)),
                   "json_object": True if json_object else None}
    constraints = {k: v for k, v in constraints.items() if v is not None}
    if len(constraints) > 1:
        raise ValueError(f"give at most one structured-output constraint, got {sorted(constraints)}")
    values = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, seed=seed, logprobs=logprobs)
    sampling = pb.SamplingParams(**{k: v for k, v in values.items() if v is not None},
                                 stop=[stop] if isinstance(stop, str) else list(stop),
                                 stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos,
                                 include_stop_str_in_output=include_stop_str_in_output,
                                 logit_bias=dict(logit_bias or {}))
    if constraints:
        sampling.structured_output.CopyFrom(pb.StructuredOutput(**constraints))
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    req = pb.GenerateRequest(model=model, sampling=sampling, request_id=request_id, priority=priority, n=n)
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.chat.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"])
                                                    for m in messages]))
    else:
        req.prompt_token_ids.CopyFrom(pb.TokenIds(ids=list(prompt_token_ids)))
    return req


def _completion(r: pb.GenerateResponse) -> Completion:
    choices = [Choice(c.index, c.text, list(c.token_ids), c.finish_reason) for c in r.choices]
    return Completion(r.text, list(r.token_ids), r.finish_reason, Usage.from_pb(r.usage), r.request_id, r.model,
                      choices)


def _models(r: pb.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(m.id, m.uri, m.quantization, m.max_model_len) for m in r.models]


_HEALTH_NAMES = health_pb2.HealthCheckResponse.ServingStatus.Name


class Client:
    """A blocking client over one insecure gRPC channel, which it owns (``close()`` or ``with``).

    Thread-safe as gRPC channels are. ``generate`` / ``stream`` take :func:`build_request`'s
    arguments plus ``timeout`` (seconds, sent as the call's deadline). ``application`` names the
    Serve application on a Ray cluster that runs several (``NAMESPACE.NAME`` for the operator's
    Serve-API mode).
    """

    def __init__(self, address: str, *, application: str | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> None:
        self.address = address
        # Serve's gRPC proxy picks the application by this key when a cluster runs several.
        self.metadata = (("application", application),) if application else None
        self.channel = grpc.insecure_channel(address, options=list(options))
        self._stub = pb_grpc.InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        req = build_request(prompt, **kwargs)
        try:
            return _completion(self._stub.Generate(req, timeout=timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None

    def stream(self, prompt: str | None = None, *, timeout: float | None = None,
               **kwargs: Any) -> Iterator[StreamDelta]:
        """Yield deltas as the server produces them; leaving the loop early cancels the request."""
        req = build_request(prompt, **kwargs)
        call = self._stub.GenerateStream(req, timeout=timeout, metadata=self.metadata)
        try:
            for msg in call:
                yield StreamDelta.from_pb(msg)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the stream has ended

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            return _models(self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health check's status name: SERVING, NOT_SERVING, ..."""
        try:
            r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None
        return _HEALTH_NAMES(r.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`, over one ``grpc.aio`` channel it owns (``await close()``
    or ``async with``). Use it from the event loop that created it."""

    def __init__(self, address: str, *, application: str | None = None,
                 options: Sequence[tuple[str, object]] = ()) -> None:
        self.address = address
        # Serve's gRPC proxy picks the application by this key when a cluster runs several.
        self.metadata = (("application", application),) if application else None
        self.channel = grpc.aio.insecure_channel(address, options=list(options))
        self._stub = pb_grpc.InferenceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any) -> Completion:
        req = build_request(prompt, **kwargs)
        try:
            return _completion(await self._stub.Generate(req, timeout=timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None

    async def stream(self, prompt: str | None = None, *, timeout: float | None = None,
                     **kwargs: Any) -> AsyncIterator[StreamDelta]:
        """Yield deltas as the server produces them; closing the iterator early cancels the request."""
        req = build_request(prompt, **kwargs)
        call = self._stub.GenerateStream(req, timeout=timeout, metadata=self.metadata)
        try:
            async for msg in call:
                yield StreamDelta.from_pb(msg)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            return _models(await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from None
        return _HEALTH_NAMES(r.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
