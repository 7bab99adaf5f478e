"""Checks of what a client sent that the router makes before any work: text is encodable Unicode,
a structured-output constraint parses, and messages handed back are bounded and printable."""

from __future__ import annotations

from typing import Any

from kubeinfer.router.types import Code, RouterError


def check_text(value: Any, what: str) -> None:
    """Strings must be encodable Unicode: a lone surrogate (JSON allows "\\ud800") is bad input."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RouterError(Code.INVALID_ARGUMENT, f"{what} is not valid Unicode (it holds a lone surrogate)") from None


def check_grammar(spec: dict) -> None:
    """A structured-output constraint must parse into a grammar: INVALID_ARGUMENT with the grammar
    engine's message otherwise (the engine compiles it against the vocabulary). Slow for a large
    schema: call it off the event loop."""
    from kubeinfer.worker.sampling_params import StructuredOutputParams
    from kubeinfer.worker.structured_output import GrammarError, validate  # imports xgrammar: only when used
    try:
        validate(spec if isinstance(spec, StructuredOutputParams) else StructuredOutputParams(**spec))
    except GrammarError as e:
        raise RouterError(Code.INVALID_ARGUMENT, readable(str(e), 1000)) from None


def readable(message: str, limit: int = 300) -> str:
    """A message for a client: valid Unicode, bounded in length."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message if len(message) <= limit else message[:limit] + "..."
