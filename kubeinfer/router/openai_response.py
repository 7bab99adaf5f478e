"""OpenAI's response objects and stream chunks for completions and chat, from a request's choices'
streams of ``Chunk`` (``(index, chunk)`` pairs, see kubeinfer.router.parallel): usage, logprobs
(prompt logprobs too, for ``echo``), and tool calls. Pure data conversion, no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from kubeinfer.router.openai_schema import ChatCompletionRequest, CompletionRequest
from kubeinfer.router.tool_calls import ToolCallStream, new_call_id, parse_tool_calls, tool_call
from kubeinfer.router.tools import ToolPlan
from kubeinfer.router.types import Chunk
from kubeinfer.worker.tokenizer import Tokenizer

# vLLM's stand-in for a -inf logprob (a token top-k / top-p filtered out): JSON has no infinity.
_MIN_LOGPROB = -9999.0


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, _MIN_LOGPROB)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float] | None],
                    text_offset: int) -> dict[str, list]:
    """OpenAI's legacy logprobs object for these tokens (an entry None: the first prompt token's, no logprob)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, top in zip(token_ids, entries):
        text = _token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if top is None else _finite(top.get(token)))
        out["top_logprobs"].append(None if top is None else {_token_text(tokenizer, t): _finite(lp)
                                                             for t, lp in top.items()})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out


def vllm_prompt_logprobs(tokenizer: Tokenizer, entries: list[dict[int, float] | None]) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}; the rank is counted among the entries, so it is exact within the top k."""
    out: list[dict | None] = []
    for top in entries:
        if top is None:
            out.append(None)
            continue
        out.append({str(t): {"logprob": _finite(lp), "rank": 1 + sum(other > lp for other in top.values()),
                             "decoded_token": _token_text(tokenizer, t)} for t, lp in top.items()})
    return out


def chat_logprobs(tokenizer: Tokenizer, chunks: list[Chunk], top_n: int) -> dict[str, Any] | None:
    """OpenAI's chat logprobs object (``{"content": [...]}``) for these chunks' tokens."""
    if not any(c.logprobs for c in chunks):
        return None

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for c in chunks:
        for token, top in zip(c.token_ids, c.logprobs or []):
            best = sorted(top.items(), key=lambda kv: -kv[1])[:top_n]
            content.append({**entry(token, top.get(token)), "top_logprobs": [entry(t, lp) for t, lp in best]})
    return {"content": content}


def usage(lasts: list[Chunk]) -> dict[str, Any]:
    """The prompt counted once, the choices' completions summed."""
    prompt, completion = lasts[0].prompt_tokens, sum(c.completion_tokens for c in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": lasts[0].cached_tokens}}


class _Choice:
    """One choice's state while its chunks come in."""

    def __init__(self, index: int, plan: ToolPlan) -> None:
        self.index = index
        self.started = False
        self.last: Chunk | None = None
        self.offset = 0  # completions: the text offset of the next token's logprobs
        self.text = ""  # chat with a forced call: the reply so far
        self.tools = ToolCallStream() if plan.mode == "auto" else None
        self.call_id = new_call_id() if plan.mode == "named" else None


class ResponseWriter:
    """Renders one prompt's choices as OpenAI objects, for completions or chat: one writer per
    prompt, fed each choice's chunks in order (choices interleaved; ``index`` counts from 0 within
    the prompt, the objects number them from ``first_index``). ``done`` once every choice has its
    finished chunk.

    Completions with ``echo``: each choice's text starts with the prompt (the prompt string, or the
    prompt ids decoded) and, with ``logprobs``, its logprobs with the prompt's (from the chunk that
    carries ``prompt_logprobs``, the first choice's first chunk). ``max_tokens: 0`` (echo only):
    the one token generated is dropped from text, logprobs and usage.
    """

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str, created: int,
                 tokenizer: Tokenizer, request: CompletionRequest | ChatCompletionRequest, *,
                 prompt_token_ids: list[int], prompt_text: str | None = None, n: int = 1,
                 first_index: int = 0) -> None:
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        self.include_usage = request.include_usage
        self.top_logprobs = (request.top_logprobs or 0) if self.chat else 0
        self.plan = request.tool_plan() if self.chat else ToolPlan("none")
        self.prompt_ids = prompt_token_ids
        self.echo = not self.chat and bool(request.echo)
        self.score_only = self.echo and request.max_tokens == 0
        self.echo_text = (prompt_text or tokenizer.decode(prompt_token_ids, skip_special_tokens=False)
                          if self.echo else "")
        self.echo_logprobs = self.echo and request.logprobs is not None
        self.want_prompt_logprobs = not self.chat and request.prompt_logprobs is not None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.choices = [_Choice(first_index + i, self.plan) for i in range(n)]

    @property
    def done(self) -> bool:
        return all(c.last is not None and c.last.finished for c in self.choices)

    def _envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        obj = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if stream and self.include_usage:
            out["usage"] = None
        return out

    def _see(self, chunk: Chunk) -> Chunk:
        """Note the prompt logprobs a chunk carries; a scoring-only request's chunk loses its token."""
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        if self.score_only:
            chunk = Chunk(chunk.request_id, finish_reason="length" if chunk.finished else None,
                          prompt_tokens=chunk.prompt_tokens, cached_tokens=chunk.cached_tokens)
        return chunk

    def _completion_logprobs(self, choice: _Choice, chunks: list[Chunk], first: bool) -> dict[str, Any] | None:
        out = None
        if first and self.echo_logprobs:
            entries = self.prompt_logprobs or [None] * len(self.prompt_ids)
            out = legacy_logprobs(self.tokenizer, self.prompt_ids, entries, 0)
            choice.offset = len(self.echo_text)
        for c in chunks:
            if c.logprobs:
                part = legacy_logprobs(self.tokenizer, c.token_ids, c.logprobs, choice.offset)
                out = part if out is None else {k: out[k] + part[k] for k in out}
            choice.offset += len(c.text)
        return out

    @staticmethod
    def _finish_reason(choice: _Choice, calls: int) -> str | None:
        """A reply that ended by itself with tool calls in it finished for "tool_calls" (one cut
        short keeps "length": its last call may be incomplete)."""
        reason = choice.last.finish_reason if choice.last else None
        return "tool_calls" if calls and reason == "stop" else reason

    # ---- streaming --------------------------------------------------------------------------------

    def stream_chunks(self, index: int, chunk: Chunk) -> list[dict[str, Any]]:
        """The stream chunks for one router chunk of choice ``index`` (none when it adds nothing a
        client sees)."""
        choice, chunk = self.choices[index], self._see(chunk)
        first, choice.started, choice.last = not choice.started, True, chunk
        if self.chat:
            return self._chat_stream_chunks(choice, chunk, first)
        if not (chunk.text or chunk.finished or chunk.logprobs or first and self.echo):
            return []
        out = {"index": choice.index, "text": (self.echo_text if first else "") + chunk.text,
               "logprobs": self._completion_logprobs(choice, [chunk], first), "finish_reason": chunk.finish_reason}
        if first and self.want_prompt_logprobs and self.prompt_logprobs is not None:
            out["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, self.prompt_logprobs)
        return [self._envelope([out], True)]

    def _chat_stream_chunks(self, choice: _Choice, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if first:
            deltas.append({"role": "assistant", "content": ""})
            if self.plan.mode == "named":
                deltas.append({"tool_calls": [{"index": 0, "id": choice.call_id, "type": "function",
                                               "function": {"name": self.plan.function, "arguments": ""}}]})
        calls = 0
        if self.plan.mode == "auto":
            deltas += choice.tools.feed(chunk.text)
            if chunk.finished:
                deltas += choice.tools.finish()
            calls = choice.tools.calls
        elif self.plan.mode == "named":
            if chunk.text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": chunk.text}}]})
            calls = 1
        elif self.plan.mode == "required":
            choice.text += chunk.text
            if chunk.finished:
                content, tool_calls = _required_calls(choice.text)
                calls = len(tool_calls)
                deltas += [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(tool_calls)]
                if content:
                    deltas.append({"content": content})
        elif chunk.text:
            deltas.append({"content": chunk.text})
        logprobs = chat_logprobs(self.tokenizer, [chunk], self.top_logprobs)
        if (logprobs is not None or chunk.finished) and (not deltas or "role" in deltas[-1]):
            deltas.append({})  # a chunk of its own for the finish reason or the logprobs
        out = []
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            out.append(self._envelope([{"index": choice.index, "delta": delta,
                                        "logprobs": logprobs if last else None,
                                        "finish_reason": self._finish_reason(choice, calls) if last else None}], True))
        return out

    def usage(self) -> dict[str, Any]:
        return usage([c.last for c in self.choices])

    def usage_chunk(self) -> dict[str, Any]:
        """The extra last stream chunk that ``stream_options.include_usage`` asks for."""
        return {**self._envelope([], True), "usage": self.usage()}

    # ---- whole responses --------------------------------------------------------------------------

    def response(self, items: list[tuple[int, Chunk]]) -> dict[str, Any]:
        """The whole (non-streaming) response for a finished request's ``(index, chunk)`` pairs."""
        per_choice: list[list[Chunk]] = [[] for _ in self.choices]
        for index, chunk in items:
            per_choice[index].append(self._see(chunk))
        choices = []
        for choice, chunks in zip(self.choices, per_choice):
            choice.last = chunks[-1]
            text = "".join(c.text for c in chunks)
            if self.chat:
                logprobs = chat_logprobs(self.tokenizer, chunks, self.top_logprobs)
                message, calls = self._message(text)
                choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                                "finish_reason": self._finish_reason(choice, calls)})
                continue
            out = {"index": choice.index, "text": self.echo_text + text,
                   "logprobs": self._completion_logprobs(choice, chunks, True), "finish_reason": choice.last.finish_reason}
            if self.want_prompt_logprobs:
                out["prompt_logprobs"] = (None if self.prompt_logprobs is None
                                          else vllm_prompt_logprobs(self.tokenizer, self.prompt_logprobs))
            choices.append(out)
        return {**self._envelope(choices, False), "usage": self.usage()}

    def _message(self, text: str) -> tuple[dict[str, Any], int]:
        """The chat message for a reply's text, and how many tool calls it holds."""
        if self.plan.mode == "auto":
            content, calls = parse_tool_calls(text)
        elif self.plan.mode == "required":
            content, calls = _required_calls(text)
        elif self.plan.mode == "named":
            content, calls = (None, [tool_call(self.plan.function, text)]) if _is_json(text) else (text, [])
        else:
            content, calls = text, []
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return message, len(calls)


class BatchResponseWriter:
    """A completions request that lists several prompts: one ResponseWriter per prompt, each with
    ``n`` choices, numbered as OpenAI and vLLM number them (prompt p's j-th choice is ``p * n + j``,
    the ``index`` this writer is fed). The response has the first writer's id and the usage summed
    over the prompts."""

    def __init__(self, writers: list[ResponseWriter], n: int) -> None:
        self.writers, self.n = writers, n
        self.include_usage = writers[0].include_usage

    @property
    def done(self) -> bool:
        return all(w.done for w in self.writers)

    def stream_chunks(self, index: int, chunk: Chunk) -> list[dict[str, Any]]:
        return self.writers[index // self.n].stream_chunks(index % self.n, chunk)

    def usage(self) -> dict[str, Any]:
        parts = [w.usage() for w in self.writers]
        out = {k: sum(u[k] for u in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        out["prompt_tokens_details"] = {"cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in parts)}
        return out

    def usage_chunk(self) -> dict[str, Any]:
        return {**self.writers[0].usage_chunk(), "usage": self.usage()}

    def response(self, items: list[tuple[int, Chunk]]) -> dict[str, Any]:
        per_prompt: list[list[tuple[int, Chunk]]] = [[] for _ in self.writers]
        for index, chunk in items:
            per_prompt[index // self.n].append((index % self.n, chunk))
        parts = [w.response(mine) for w, mine in zip(self.writers, per_prompt)]
        return {**parts[0], "choices": [c for part in parts for c in part["choices"]], "usage": self.usage()}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _required_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A required reply (a JSON list of {"name", "arguments"}, as the grammar forces) as tool calls;
    one cut short (max_tokens) stays text."""
    try:
        calls = json.loads(text)
    except ValueError:
        return text, []
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return text, []
    return None, [tool_call(c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False)) for c in calls]
