"""Tool calls in a model's output, Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`` blocks (the syntax SmolLM2's and Qwen2's chat templates teach), read into
OpenAI's ``tool_calls``: whole (:func:`parse_tool_calls`) or as a stream (:class:`ToolCallStream`).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)(?:" + re.escape(END) + r"|\Z)", re.DOTALL)
# The head of a block, up to where the arguments' JSON begins (once its first character is there).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
# What may end an arguments fragment without being part of it: the block's closing brace and tag.
_TAIL = re.compile(r"[\s}]*(?:<(?:/(?:t(?:o(?:o(?:l(?:_(?:c(?:a(?:l(?:l(?:>)?)?)?)?)?)?)?)?)?)?)?)?\Z")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    """One entry of OpenAI's ``message.tool_calls``; ``arguments`` is JSON text."""
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_of(body: str) -> dict[str, Any] | None:
    """The call a block's JSON body names, or None if it is not ``{"name": str, "arguments": ...}``."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return tool_call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of a whole output. ``content`` is the text outside the blocks (None
    when only blanks); a last block may lack its closing tag. When a block is not a well-formed
    call, the whole output is content and there are no calls (as vLLM's Hermes parser does)."""
    if START not in text:
        return text, []
    calls, outside, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _call_of(m.group(1))
        if call is None:
            return text, []
        calls.append(call)
        outside.append(text[pos:m.start()])
        pos = m.end()
    outside.append(text[pos:])
    content = "".join(outside).strip()
    return content or None, calls


def _held_start(text: str) -> int:
    """Where the longest suffix of ``text`` that may begin ``<tool_call>`` starts (len: none)."""
    for k in range(min(len(text), len(START) - 1), 0, -1):
        if START.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class ToolCallStream:
    """Turns an output's text, fed as it streams, into OpenAI's stream deltas: ``{"content": ...}``
    for text outside blocks (text that may be the start of a tag is held back until it is known),
    and ``{"tool_calls": [...]}`` fragments, the first of a call carrying its index, id, type and
    name with empty arguments, the next ones pieces of its arguments' JSON text.

    A block whose head is not ``{"name": ..., "arguments": `` is held whole until it closes, then
    sent as one call if its JSON is one, else as content. ``calls`` counts the calls sent.
    """

    def __init__(self) -> None:
        self._buf = ""  # text not yet sent: outside a block, or the current block's body
        self._in_block = False
        self._sent = 0  # of the current block's body: characters already sent as arguments
        self._args_at: int | None = None  # where the arguments begin in the body, once the head is read
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._buf += text
        out: list[dict[str, Any]] = []
        while True:
            if not self._in_block:
                at = self._buf.find(START)
                if at < 0:
                    keep = _held_start(self._buf)
                    self._content(out, self._buf[:keep])
                    self._buf = self._buf[keep:]
                    return out
                self._content(out, self._buf[:at])
                self._buf, self._in_block, self._sent, self._args_at = self._buf[at + len(START):], True, 0, None
                continue
            end = self._buf.find(END)
            body = self._buf if end < 0 else self._buf[:end]
            self._block(out, body, closed=end >= 0)
            if end < 0:
                return out
            self._buf, self._in_block = self._buf[end + len(END):], False

    def finish(self) -> list[dict[str, Any]]:
        """The deltas for what was held back once the output has ended (an unclosed block is read
        as if closed)."""
        out: list[dict[str, Any]] = []
        if self._in_block:
            self._block(out, self._buf, closed=True)
        else:
            self._content(out, self._buf)
        self._buf, self._in_block = "", False
        return out

    def _content(self, out: list[dict[str, Any]], text: str) -> None:
        if text.strip() if self.calls else text:  # blanks between and after calls are dropped
            out.append({"content": text})

    def _fragment(self, out: list[dict[str, Any]], fragment: dict[str, Any]) -> None:
        out.append({"tool_calls": [{"index": self.calls - 1, **fragment}]})

    def _block(self, out: list[dict[str, Any]], body: str, closed: bool) -> None:
        if self._args_at is None:
            head = _HEAD.match(body)
            if head is not None:
                self._args_at = self._sent = head.end()
                self.calls += 1
                self._fragment(out, {"id": new_call_id(), "type": "function",
                                     "function": {"name": json.loads(head.group(1)), "arguments": ""}})
            elif closed:
                call = _call_of(body)
                if call is None:
                    self._content(out, START + body + END)
                else:
                    self.calls += 1
                    self._fragment(out, call)
                return
            else:
                return
        if closed:  # the arguments end before the block's own closing brace
            stop = body.rstrip()
            stop = len(stop) - 1 if stop.endswith("}") and len(stop) - 1 >= self._sent else len(body)
        else:
            stop = _TAIL.search(body, self._sent).start()
        if stop > self._sent:
            self._fragment(out, {"function": {"arguments": body[self._sent:stop].rstrip() if closed
                                              else body[self._sent:stop]}})
            self._sent = stop
