"""OpenAI's request and response shapes for completions and chat, and their mapping onto the
Router: request bodies become ``Router.prepare`` keyword arguments, streams of ``Chunk`` become
OpenAI's response objects and stream chunks. Pure data conversion, no I/O.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kubeinfer.router.types import Chunk
from kubeinfer.worker.tokenizer import Tokenizer


class UnsupportedField(ValueError):
    """A request field this server does not implement, set to something other than its default."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# Request fields that are SamplingParams fields of the same name and meaning.
_SAMPLING_FIELDS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k",
                    "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                    "skip_special_tokens")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    include_usage: bool | None = None


class _GenerateRequest(BaseModel):
    """The fields completions and chat share: OpenAI's sampling fields plus vLLM's extras.

    Strict types (no "0.5" for a float, no true for an integer) so a wrong type is a 400 rather
    than a silent coercion; unknown fields are ignored, as OpenAI's own server does.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    priority: int = 0
    # structured output: OpenAI's response_format, or one of vLLM's guided_* extras
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def sampling(self) -> dict[str, Any]:
        """``SamplingParams`` keyword arguments: the fields the client set (the rest keep vLLM's defaults)."""
        if self.n not in (None, 1):
            raise UnsupportedField("n", f"n must be 1 (one choice per request), got {self.n}")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        out = {f: getattr(self, f) for f in _SAMPLING_FIELDS if getattr(self, f) is not None}
        if self.max_tokens is not None:
            out["max_tokens"] = self.max_tokens
        structured = self.structured_output()
        if structured is not None:
            out["structured_output"] = structured
        return out

    def structured_output(self) -> dict[str, Any] | None:
        """``StructuredOutputParams`` keyword arguments from response_format or a guided_* field
        (at most one of them); None when the output is free text. Whether the schema, regex or
        grammar compiles is the router's check (kubeinfer.worker.structured_output)."""
        given: list[tuple[str, dict[str, Any]]] = []
        if self.response_format is not None:
            spec = _response_format(self.response_format)
            if spec is not None:
                given.append(("response_format", spec))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {key: value}))
        if self.guided_decoding_backend not in (None, "xgrammar", "auto"):
            raise UnsupportedField("guided_decoding_backend", "the only guided decoding backend is xgrammar, got "
                                                              f"{self.guided_decoding_backend!r}")
        if len(given) > 1:
            raise UnsupportedField(given[1][0], "give one structured-output constraint, got "
                                                f"{', '.join(name for name, _ in given)}")
        return given[0][1] if given else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerateRequest):
    """``POST /v1/completions``: one prompt (a string, or token ids, or a list holding one of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def prepare_kwargs(self) -> dict[str, Any]:
        """``Router.prepare`` keyword arguments."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise UnsupportedField("prompt", f"give one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", f"best_of must be 1, got {self.best_of}")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")
        sampling = self.sampling()
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        kwargs = {"model": self.model, "sampling": sampling, "priority": self.priority}
        kwargs["prompt" if isinstance(prompt, str) else "prompt_token_ids"] = prompt
        return kwargs


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` as StructuredOutputParams keyword arguments (None for text).
    ``json_schema.strict`` is accepted either way: the schema is always enforced (xgrammar's strict
    mode: no properties or items the schema does not name), as vLLM does."""
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise UnsupportedField("response_format", "response_format json_schema needs "
                                                      "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise UnsupportedField("response_format", "response_format.json_schema.strict must be a boolean")
        return {"json": spec["schema"]}
    raise UnsupportedField("response_format", "response_format type must be text, json_object or json_schema, "
                                              f"got {kind!r}")


class TextPart(BaseModel):
    """One text part of a chat message's content (the only kind of part served)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; the Router checks the role and renders the chat template."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | list[TextPart]


class ChatCompletionRequest(_GenerateRequest):
    """``POST /v1/chat/completions``. Without a token limit the reply may fill the context (as in vLLM)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None

    def prepare_kwargs(self) -> dict[str, Any]:
        """``Router.prepare`` keyword arguments."""
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        sampling = self.sampling()
        if self.max_completion_tokens is not None:
            sampling["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        # "developer" is OpenAI's newer name for the system role.
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in self.messages]
        return {"model": self.model, "messages": messages, "sampling": sampling, "priority": self.priority}


# ---- responses ---------------------------------------------------------------------------------


def usage(last: Chunk) -> dict[str, Any]:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}


# vLLM's stand-in for a -inf logprob (a token top-k / top-p filtered out): JSON has no infinity.
_MIN_LOGPROB = -9999.0


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, _MIN_LOGPROB)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, chunks: list[Chunk], text_offset: int) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs object for these chunks' tokens; offsets start at ``text_offset``."""
    if not any(c.logprobs for c in chunks):
        return None
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for token, top in zip(c.token_ids, c.logprobs or []):
            text = _token_text(tokenizer, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(top.get(token)))
            out["top_logprobs"].append({_token_text(tokenizer, t): _finite(lp) for t, lp in top.items()})
            out["text_offset"].append(text_offset)
            text_offset += len(text)
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


class ResponseWriter:
    """Renders one request's chunks as OpenAI objects, for completions or chat.

    Owns the response id, creation time and, for completions, the running text offset of logprobs;
    one writer per request, fed its chunks in order.
    """

    def __init__(self, kind: Literal["completion", "chat"], request_id: str, model: str, created: int,
                 tokenizer: Tokenizer, request: CompletionRequest | ChatCompletionRequest) -> None:
        self.chat = kind == "chat"
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.model = model
        self.created = created
        self.tokenizer = tokenizer
        self.include_usage = request.include_usage
        self.top_logprobs = (request.top_logprobs or 0) if self.chat else 0
        self._offset = 0

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def _logprobs(self, chunks: list[Chunk]) -> dict[str, Any] | None:
        if self.chat:
            return chat_logprobs(self.tokenizer, chunks, self.top_logprobs)
        logprobs = completion_logprobs(self.tokenizer, chunks, self._offset)
        self._offset += sum(len(c.text) for c in chunks)
        return logprobs

    def stream_chunks(self, chunk: Chunk, first: bool) -> list[dict[str, Any]]:
        """The stream chunks for one router chunk (none when it adds nothing a client sees)."""
        out = []
        if self.chat and first:
            out.append(self._envelope("chat.completion.chunk", [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
        if not (chunk.text or chunk.finished or chunk.logprobs):
            return out
        choice = {"index": 0, "logprobs": self._logprobs([chunk]), "finish_reason": chunk.finish_reason}
        if self.chat:
            choice["delta"] = {"content": chunk.text} if chunk.text else {}
        else:
            choice["text"] = chunk.text
        out.append(self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice]))
        return out

    def usage_chunk(self, last: Chunk) -> dict[str, Any]:
        """The extra last stream chunk that ``stream_options.include_usage`` asks for."""
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion", []),
                "usage": usage(last)}

    def response(self, chunks: list[Chunk]) -> dict[str, Any]:
        """The whole (non-streaming) response for a finished request's chunks."""
        text, last = "".join(c.text for c in chunks), chunks[-1]
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(chunks), "finish_reason": last.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage(last)}


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "service_unavailable",
               504: "timeout"}
