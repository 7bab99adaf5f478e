"""``POST /v1/responses``: OpenAI's Responses API over the chat path.

The request becomes a chat request (``ResponsesRequest.to_chat``) and runs as one; the chat
ResponseWriter renders the reply (text, tool calls, usage) as it does for ``/v1/chat/completions``,
and ResponseRenderer writes that as a Response object or as the Responses stream's typed events
(``response.created`` ... ``response.output_text.delta`` ... ``response.completed``). Text streams
as it is made; function calls are emitted whole when the reply ends (a call is parsed from the
finished text), each as its ``output_item.added``, ``function_call_arguments.delta`` / ``.done``
and ``output_item.done`` events.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response

from kubeinfer.router.http_streams import DetachedStream, respond, unless_client_gone
from kubeinfer.router.openai_response import ResponseWriter
from kubeinfer.router.parallel import stream_choices
from kubeinfer.router.responses_request import ResponsesRequest
from kubeinfer.router.router import Router
from kubeinfer.router.types import Chunk, Code, RouterError


class ResponseRenderer:
    """One request's Response object and stream events. Owns the output items built so far and the
    events' sequence numbers (one counter per response, from 0)."""

    def __init__(self, body: ResponsesRequest, request_id: str, model: str, created: int) -> None:
        self.body, self.model, self.created = body, model, created
        self.id = f"resp_{request_id}"
        self.message_id = f"msg_{request_id}"
        self.sequence = 0
        self.text = ""
        self.opened = False  # the message item has been announced
        self.calls: dict[int, dict[str, str]] = {}  # streamed tool-call fragments by index
        self.finish_reason: str | None = None

    def envelope(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        b = self.body
        incomplete = status == "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
                "temperature": b.temperature, "top_p": b.top_p,
                "parallel_tool_calls": True if b.parallel_tool_calls is None else b.parallel_tool_calls,
                "tool_choice": b.tool_choice if b.tool_choice is not None else "auto", "tools": b.tools or [],
                "text": b.text or {"format": {"type": "text"}}, "metadata": b.metadata or {},
                "previous_response_id": None, "store": False, "truncation": "disabled", "user": b.user}

    @staticmethod
    def usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
        return {"input_tokens": chat_usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": chat_usage["total_tokens"]}

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def _call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        return {"id": f"fc_{call['id'].removeprefix('call_')}", "type": "function_call", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}

    def response(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The Response object for a finished chat completion (``ResponseWriter.response``'s)."""
        choice = chat["choices"][0]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        message, calls = choice["message"], choice["message"].get("tool_calls") or []
        # A reply of calls alone has no message item; any other reply has one, empty text included.
        output = [self._message(message["content"] or "", status)] if message["content"] or not calls else []
        output += [self._call(c) for c in calls]
        return self.envelope(status, output, self.usage(chat["usage"]))

    # ---- streaming ---------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        opening = self.envelope("in_progress", [], None)
        return [self.event("response.created", response=opening), self.event("response.in_progress", response=opening)]

    def feed(self, chat_chunks: list[dict[str, Any]]) -> list[str]:
        """The events for the chat stream chunks of one router chunk."""
        out = []
        for c in chat_chunks:
            choice = c["choices"][0]
            delta = choice["delta"]
            if delta.get("content"):
                out += self._open()
                self.text += delta["content"]
                out.append(self.event("response.output_text.delta", item_id=self.message_id, output_index=0,
                                      content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                mine = self.calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
                fn = call.get("function") or {}
                mine["id"] = call.get("id") or mine["id"]
                mine["name"] = fn.get("name") or mine["name"]
                mine["arguments"] += fn.get("arguments") or ""
            self.finish_reason = choice["finish_reason"] or self.finish_reason
        return out

    def _open(self) -> list[str]:
        """The message item's opening events, once."""
        if self.opened:
            return []
        self.opened = True
        return [self.event("response.output_item.added", output_index=0,
                           item={**self._message("", "in_progress"), "content": []}),
                self.event("response.content_part.added", item_id=self.message_id, output_index=0, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def finish(self, chat_usage: dict[str, Any]) -> list[str]:
        """The closing events: the message's and each function call's, then ``response.completed``
        (``response.incomplete`` when the token limit cut the reply)."""
        status = "incomplete" if self.finish_reason == "length" else "completed"
        out = [] if self.calls else self._open()  # as ``response``: a reply of calls alone has no message
        output = []
        if self.opened:
            item = self._message(self.text, status)
            out.append(self.event("response.output_text.done", item_id=self.message_id, output_index=0,
                                  content_index=0, text=self.text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=self.message_id, output_index=0,
                                  content_index=0, part=item["content"][0]))
            out.append(self.event("response.output_item.done", output_index=0, item=item))
            output.append(item)
        for _, call in sorted(self.calls.items()):
            index = len(output)
            item = self._call({"id": call["id"], "function": {"name": call["name"], "arguments": call["arguments"]}})
            out.append(self.event("response.output_item.added", output_index=index,
                                  item={**item, "arguments": "", "status": "in_progress"}))
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                  delta=item["arguments"]))
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                  name=item["name"], arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=index, item=item))
            output.append(item)
        final = self.envelope(status, output, self.usage(chat_usage))
        out.append(self.event("response.completed" if status == "completed" else "response.incomplete", response=final))
        return out


async def _events(renderer: ResponseRenderer, writer: ResponseWriter, first: tuple[int, Chunk],
                  stream: DetachedStream) -> AsyncIterator[str]:
    try:
        for event in renderer.start():
            yield event
        item = first
        while True:
            for event in renderer.feed(writer.stream_chunks(*item)):
                yield event
            if writer.done:
                break
            item = await stream.next()
            if item is None:  # the router's invariant says this cannot happen
                raise RouterError(Code.INTERNAL, "the stream ended without a finish reason")
        for event in renderer.finish(writer.usage()):
            yield event
    except RouterError as e:  # the status line is gone: the stream's own error event says it
        yield renderer.event("error", code=e.code.name.lower(), message=e.message, param=None)
    finally:
        stream.close()


def add_responses_routes(app: FastAPI, router: Router, streaming_tasks: set[asyncio.Task]) -> None:
    """Adds ``POST /v1/responses`` to the OpenAI app over ``router`` (whose error handlers answer a
    RouterError or UnsupportedField with its status and JSON)."""

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        chat = body.to_chat()
        job = await unless_client_gone(request, router.aprepare(**chat.prepare_kwargs(), fill_context=True))
        created = int(time.time())
        writer = ResponseWriter("chat", job.request_id, job.model, created, router.models[job.model].tokenizer, chat,
                                prompt_token_ids=job.prompt_token_ids)
        renderer = ResponseRenderer(body, job.request_id, job.model, created)
        stream = DetachedStream(stream_choices(router, [job]), streaming_tasks)
        return await respond(request, stream, bool(body.stream), lambda chunks: renderer.response(writer.response(chunks)),
                             lambda first: _events(renderer, writer, first, stream))
