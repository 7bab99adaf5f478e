"""OpenAI's Responses API request (``POST /v1/responses``) as the chat request it amounts to.

A Responses request is a chat request in other words: ``instructions`` is a system message,
``input`` a string or a list of messages and function-call items, ``max_output_tokens`` the token
limit, ``text.format`` the response format, function ``tools`` flattened. ``to_chat`` writes it as a
ChatCompletionRequest, so every check and every feature of the chat path (sampling, tools,
structured output, the chat template) is the one definition. Stateless: nothing is stored, so
``previous_response_id`` (and ``store: true`` retrieval) is refused; a client sends the conversation.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from kubeinfer.router.openai_schema import ChatCompletionRequest, UnsupportedField

# Content part types that hold text, in input messages and in replayed assistant output.
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    """``POST /v1/responses``: the fields served. Unknown fields are ignored, as on chat."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    top_logprobs: int | None = None
    user: str | None = None
    # vLLM's extras, as on chat
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    priority: int = 0

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this one is; UnsupportedField for what the Responses surface does not serve."""
        if self.previous_response_id is not None:
            raise UnsupportedField("previous_response_id", "previous_response_id is not supported: responses are not "
                                                           "stored; send the conversation in input")
        if self.top_logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs is not supported on /v1/responses")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += [{"role": "user", "content": self.input}] if isinstance(self.input, str) else _messages(self.input)
        body: dict[str, Any] = {"messages": messages, "stream": bool(self.stream), "priority": self.priority}
        for name in ("model", "temperature", "top_p", "parallel_tool_calls", "seed", "top_k", "min_p",
                     "repetition_penalty", "ignore_eos"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.text and self.text.get("format") is not None:
            body["response_format"] = _response_format(self.text["format"])
        if self.tools:
            body["tools"] = [_function_tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _tool_choice(self.tool_choice)
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            raise UnsupportedField("input", f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


def _messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: messages (content a string or text parts), function calls
    (consecutive ones are one assistant message's ``tool_calls``) and their outputs (tool messages)."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(i, item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else _text(i, output)})
        else:
            raise UnsupportedField("input", f"input[{i}] is of type {kind!r}; served are message, function_call "
                                            "and function_call_output")
    return out


def _text(index: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        other = [p.get("type") for p in content if p.get("type") not in _TEXT_PARTS]
        if not other and all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        if other:
            raise UnsupportedField("input", f"input[{index}] has a content part of type {other[0]!r}; only text "
                                            f"parts ({', '.join(_TEXT_PARTS)}) are served")
    raise UnsupportedField("input", f"input[{index}].content must be a string or a list of text parts")


def _response_format(fmt: Any) -> dict[str, Any]:
    """``text.format`` as chat's ``response_format`` (the Responses API flattens json_schema)."""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise UnsupportedField("text", "text.format.type must be text, json_object or json_schema")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": spec}


def _function_tool(index: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise UnsupportedField("tools", f"tools[{index}] is of type {tool.get('type')!r}; only function tools are "
                                        "served (the server runs no hosted tools)")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice  # "none" | "auto" | "required", or a bad value the chat path names
