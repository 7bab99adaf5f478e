"""OpenAI's ``tools`` and ``tool_choice`` on chat: checked, then turned into what the request needs
(:class:`ToolPlan`): the tools the chat template renders, a structured-output constraint when a call
is forced, and how the reply is read back (kubeinfer.router.tool_calls).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """``mode``: none (no tools rendered, the reply is text), auto (the model may write
    ``<tool_call>`` blocks, which are parsed), required (the reply is constrained to a JSON list of
    ``{"name", "arguments"}`` calls of the declared tools) or named (the reply is constrained to
    the named function's arguments). ``structured_output`` is the constraint (None for none/auto)."""

    mode: Literal["none", "auto", "required", "named"]
    tools: list[dict[str, Any]] | None = None
    structured_output: dict[str, Any] | None = None
    function: str | None = None  # named: the function's name


def _functions(tools: Any, bad: Callable[[str, str], Exception]) -> dict[str, dict[str, Any]]:
    """name -> the function object of each tool, checked: OpenAI's shape, unique names."""
    if not isinstance(tools, list) or not tools:
        raise bad("tools", "tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad("tools", f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -, got {name!r}")
        if name in out:
            raise bad("tools", f"two tools are named {name!r}")
        if "parameters" in fn and fn["parameters"] is not None and not isinstance(fn["parameters"], dict):
            raise bad("tools", f"tools[{i}].function.parameters must be a JSON schema object")
        if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
            raise bad("tools", f"tools[{i}].function.description must be a string")
        out[name] = fn
    return out


def _call_schema(name: str, fn: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                             "arguments": fn.get("parameters") or EMPTY_PARAMETERS},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
               bad: Callable[[str, str], Exception]) -> ToolPlan:
    """The plan for a chat request's ``tools`` / ``tool_choice``; ``bad(param, message)`` makes the
    exception raised for bad input. Without tools, ``tool_choice`` may only be none (or unset);
    with tools it defaults to auto. ``parallel_tool_calls: false`` limits a required reply to one call."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none"):
            raise bad("tool_choice", "tool_choice needs tools")
        return ToolPlan("none")
    functions = _functions(tools, bad)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none")
    if choice == "auto":
        return ToolPlan("auto", tools=tools)
    if choice == "required":
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": {"anyOf": [_call_schema(n, f) for n, f in functions.items()]}}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools=tools, structured_output={"json": schema})
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad("tool_choice", "tool_choice must be none, auto, required or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    name = fn.get("name")
    if not isinstance(name, str) or name not in functions:
        raise bad("tool_choice", f"tool_choice names the function {name!r}, which is not among the tools "
                                 f"({', '.join(functions)})")
    return ToolPlan("named", tools=tools, function=name,
                    structured_output={"json": functions[name].get("parameters") or EMPTY_PARAMETERS})
