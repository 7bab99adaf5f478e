"""OpenAI's request shapes for completions and chat, and their mapping onto the Router: request
bodies become ``Router.prepare`` keyword arguments (responses: kubeinfer.router.openai_response).
Pure data conversion, no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from kubeinfer.router.tools import ToolPlan, plan_tools
from kubeinfer.worker.tokenizer import ChatTemplate


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
        out = {f: getattr(self, f) for f in _SAMPLING_FIELDS if getattr(self, f) is not None}
        if self.logit_bias:
            if not all(k.isdigit() for k in self.logit_bias):
                raise UnsupportedField("logit_bias", "logit_bias keys must be token ids (decimal integers), got "
                                                     f"{next(k for k in self.logit_bias if not k.isdigit())!r}")
            out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
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
    def num_choices(self) -> int:
        """``n``, at least 1 (the router bounds it from above: ``RouterSettings.max_n``)."""
        if self.n is not None and self.n < 1:
            raise UnsupportedField("n", f"n must be at least 1, got {self.n}")
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerateRequest):
    """``POST /v1/completions``: a prompt (a string or token ids), or a list of them (OpenAI's batch
    form, which lm-eval sends at ``batch_size`` > 1): each prompt gets ``n`` choices."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    prompt_logprobs: int | None = None  # vLLM's extra

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: the one prompt, or each of the list."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise UnsupportedField("prompt", "prompt must not be empty")
        return list(prompt)

    def prepare_kwargs(self, prompt: str | list[int]) -> dict[str, Any]:
        """``Router.prepare`` keyword arguments for ``prompt``, one of :meth:`prompts`. ``echo`` with
        ``logprobs`` asks the engine for as many prompt logprobs; ``max_tokens: 0`` with ``echo``
        (scoring only) runs one token, which the response drops."""
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", f"best_of must be 1, got {self.best_of}")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")
        sampling = self.sampling()
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        if self.echo and self.max_tokens == 0:
            sampling["max_tokens"] = 1
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        if wanted:
            sampling["prompt_logprobs"] = max(wanted)
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
    """One chat message; the Router checks the role and renders the chat template. An assistant
    message may carry ``tool_calls`` (then its content may be null), a ``tool`` message a tool's
    result for ``tool_call_id``."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def for_template(self, index: int) -> dict[str, Any]:
        """The message as chat templates take it (transformers' convention): text content, and
        tool calls' arguments as objects ("developer" is OpenAI's newer name for system)."""
        if self.content is None and not self.tool_calls:
            raise UnsupportedField("messages", f"messages[{index}] has no content")
        content = self.content or ""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content if isinstance(content, str) else "".join(p.text for p in content)}
        if self.tool_calls:
            out["tool_calls"] = [_template_call(index, c) for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _template_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
        raise UnsupportedField("messages", f"messages[{index}].tool_calls: each needs "
                                           "{\"function\": {\"name\": str, \"arguments\": JSON text}}")
    try:
        arguments = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        arguments = fn["arguments"]  # not JSON: the template gets the text as it came
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


class ChatCompletionRequest(_GenerateRequest):
    """``POST /v1/chat/completions``. Without a token limit the reply may fill the context (as in vLLM)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: Any = None  # checked by kubeinfer.router.tools, which names the bad part
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras: how the messages are rendered (kubeinfer.worker.tokenizer.ChatTemplate)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    _plan: ToolPlan | None = PrivateAttr(default=None)

    def tool_plan(self) -> ToolPlan:
        """What ``tools`` and ``tool_choice`` ask for (UnsupportedField for bad ones)."""
        if self._plan is None:
            self._plan = plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls, UnsupportedField)
        return self._plan

    def prepare_kwargs(self) -> dict[str, Any]:
        """``Router.prepare`` keyword arguments; a forced tool call (``tool_choice`` required or a
        named function) is a structured-output constraint, so it excludes another one."""
        plan = self.tool_plan()
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")
        sampling = self.sampling()
        if self.max_completion_tokens is not None:
            sampling["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        if plan.structured_output is not None:
            if "structured_output" in sampling:
                raise UnsupportedField("tool_choice", f"tool_choice {self.tool_choice!r} constrains the output: "
                                                      "it cannot be combined with response_format or guided_*")
            sampling["structured_output"] = plan.structured_output
        messages = [m.for_template(i) for i, m in enumerate(self.messages)]
        try:
            template = ChatTemplate(tools=plan.tools, add_generation_prompt=self.add_generation_prompt,
                                    continue_final_message=self.continue_final_message,
                                    kwargs=self.chat_template_kwargs)
        except ValueError as e:  # its messages start with the field's name
            raise UnsupportedField(str(e).split()[0], str(e)) from None
        return {"model": self.model, "messages": messages, "sampling": sampling, "priority": self.priority,
                "chat_template": template}


# ---- errors ------------------------------------------------------------------------------------


def error_body(message: str, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error",
               429: "rate_limit_error", 499: "cancelled", 500: "server_error", 503: "service_unavailable",
               504: "timeout"}
