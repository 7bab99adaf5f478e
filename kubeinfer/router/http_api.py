"""The OpenAI-compatible HTTP surface over a Router: completions and chat (streaming as server-sent
events), the model list, health and Prometheus metrics; OpenAI's Responses API (``responses_api``)
and vLLM's tokenizer endpoints (``tokenize_api``). Request and response shapes live in ``openai_schema``; this module only moves
them between HTTP and the Router.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kubeinfer.router.http_streams import ClientGone, DetachedStream, respond, sse, unless_client_gone
from kubeinfer.router.metrics import CONTENT_TYPE
from kubeinfer.router.openai_response import BatchResponseWriter, ResponseWriter
from kubeinfer.router.openai_schema import ChatCompletionRequest, CompletionRequest, UnsupportedField, error_body
from kubeinfer.router.parallel import check_n, expand, stream_choices
from kubeinfer.router.responses_api import add_responses_routes
from kubeinfer.router.router import Router
from kubeinfer.router.tokenize_api import add_tokenizer_routes
from kubeinfer.router.types import Chunk, Code, RouterError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    # Echoed input may hold a lone surrogate, which UTF-8 cannot carry: escape it.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = param.encode("utf-8", "backslashreplace").decode("utf-8") if param is not None else None
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return JSONResponse(error_body(message, status, param=param, code=code), status_code=status, headers=headers)


def router_error_response(e: RouterError) -> JSONResponse:
    return error_response(e.code.http_status, e.message, code=e.code.name.lower(), retry_after_s=e.retry_after_s)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return "the request body is not valid JSON", None
    # Error locations start with "body"; a union's member names make the rest long, so the field
    # itself leads the message.
    parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: {err['msg']}" for err in errors[:3]]
    first = errors[0]["loc"][1:] if errors else ()
    return "; ".join(parts), (str(first[0]) if first else None)


class _BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is parsed,
    whether its Content-Length says so or its chunks add up to it."""

    DRAIN_BYTES = 32 << 20

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        seen, too_large, answered, more = 0, False, False, True

        async def limited_receive():
            nonlocal seen, too_large, more
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = message.get("more_body", False)
                if seen > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def guarded_send(message):
            # Whatever the app makes of the interrupted read (FastAPI: a 400), the answer is the 413.
            nonlocal answered
            if not too_large:
                return await send(message)
            if not answered:
                answered = True
                await self._refuse(scope, receive, send, more)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not answered:
                answered = True
                await self._refuse(scope, receive, send, more)

    async def _refuse(self, scope, receive, send, more: bool = True) -> None:
        # Read (and drop) the rest of a body up to a bound first: a client still writing it would
        # otherwise see its connection reset instead of the 413. Beyond the bound, the reset it is.
        drained = 0
        while more and drained <= self.DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = error_response(413, f"the request body is larger than the limit (max_body_bytes) of "
                                       f"{self.max_bytes} bytes", code="request_too_large")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


async def _events(writer: ResponseWriter, first: tuple[int, Chunk], stream: DetachedStream) -> AsyncIterator[str]:
    try:
        item = first
        while True:
            for data in writer.stream_chunks(*item):
                yield sse(data)
            if writer.done:
                break
            item = await stream.next()
            if item is None:  # the router's invariant says this cannot happen
                raise RouterError(Code.INTERNAL, "the stream ended without a finish reason")
        if writer.include_usage:
            yield sse(writer.usage_chunk())
    except RouterError as e:  # the status line is gone: report it in the stream, as vLLM does
        yield sse(error_body(e.message, e.code.http_status, code=e.code.name.lower()))
    finally:
        stream.close()
    yield sse("[DONE]")


def build_http_app(router: Router) -> FastAPI:
    """The OpenAI-compatible app over ``router``; the app owns nothing but the tasks streaming its
    requests (see DetachedStream)."""
    app = FastAPI(title="kubeinfer", docs_url=None, redoc_url=None)
    streaming_tasks: set[asyncio.Task] = set()

    @app.exception_handler(RouterError)
    async def on_router_error(request: Request, e: RouterError) -> JSONResponse:
        return router_error_response(e)

    @app.exception_handler(UnsupportedField)
    async def on_unsupported(request: Request, e: UnsupportedField) -> JSONResponse:
        return error_response(400, e.message, param=e.param, code="unsupported_value")

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, _BodyTooLarge):
            raise e  # BodyLimit answers it
        log.exception("internal error serving %s", request.url.path)
        return error_response(500, "internal error; the server log has the details")

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; uvicorn logs it

    async def generate(request: Request, body: CompletionRequest | ChatCompletionRequest,
                       kind: Literal["completion", "chat"]) -> Response:
        n = check_n(body.num_choices, router.settings)
        if isinstance(body, CompletionRequest):
            prompts = body.prompts()
            each = [body.prepare_kwargs(p) for p in prompts]
        else:
            prompts, each = [None], [body.prepare_kwargs()]
        router.check_job_count(len(prompts) * n)  # before tokenizing a list no router could hold
        jobs = await unless_client_gone(request, asyncio.gather(
            *(router.aprepare(**kwargs, fill_context=kind == "chat") for kwargs in each)))
        served, created = router.models[jobs[0].model], int(time.time())
        writers = [ResponseWriter(kind, jobs[0].request_id, job.model, created, served.tokenizer, body,
                                  prompt_token_ids=job.prompt_token_ids, n=n, first_index=p * n,
                                  prompt_text=prompt if isinstance(prompt, str) else None)
                   for p, (job, prompt) in enumerate(zip(jobs, prompts))]
        writer = writers[0] if len(writers) == 1 else BatchResponseWriter(writers, n)
        stream = DetachedStream(stream_choices(router, [j for job in jobs for j in expand(job, n)], n=n),
                                 streaming_tasks)
        return await respond(request, stream, bool(body.stream), writer.response,
                             lambda first: _events(writer, first, stream))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(request, body, "chat")

    def card(m) -> dict[str, Any]:
        return {"id": m.name, "object": "model", "created": 0, "owned_by": "kubeinfer", "root": m.uri,
                "max_model_len": m.max_model_len, "quantization": m.quantization}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in router.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        return card(router.model(name))  # NOT_FOUND (404) for a model not served here

    @app.get("/health")
    async def health() -> JSONResponse:
        if router.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if unready := router.unready_models():
            return JSONResponse({"status": "unavailable", "models_without_live_replica": unready}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    add_tokenizer_routes(app, router)
    add_responses_routes(app, router, streaming_tasks)
    app.add_middleware(BodyLimit, max_bytes=router.max_body_bytes)
    return app
