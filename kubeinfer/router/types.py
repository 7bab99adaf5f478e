"""The plain data that travels between the router and the worker replicas, and the router's errors.

Both sides of a Ray Serve call pickle these, so they stay small dataclasses of builtins.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Union

# The gRPC trailer that carries a RESOURCE_EXHAUSTED answer's retry hint, in seconds (the proto's
# contract). The hint is also spelled out at the end of the status message (``with_retry_hint``),
# because a transport may drop trailers: Ray Serve's proxy does, from a stream that fails.
RETRY_AFTER_KEY = "retry-after-s"
_RETRY_HINT = re.compile(r"\(retry after ([0-9.]+) s\)$")


def with_retry_hint(message: str, retry_after_s: float | None) -> str:
    return message if retry_after_s is None else f"{message} (retry after {retry_after_s:.1f} s)"


def retry_hint_of(message: str) -> float | None:
    """The hint ``with_retry_hint`` wrote at the end of ``message``, else None."""
    m = _RETRY_HINT.search(message or "")
    return float(m.group(1)) if m else None


class Code(enum.Enum):
    """Error kinds, named after the gRPC status each maps to (the HTTP surface maps them too)."""

    INVALID_ARGUMENT = 400
    NOT_FOUND = 404
    RESOURCE_EXHAUSTED = 429
    CANCELLED = 499
    INTERNAL = 500
    UNAVAILABLE = 503
    DEADLINE_EXCEEDED = 504

    @property
    def http_status(self) -> int:
        return self.value


class RouterError(Exception):
    """A request the router answers with an error: a code, a readable message, and for
    RESOURCE_EXHAUSTED a retry hint in seconds."""

    def __init__(self, code: Code, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class ReplicaFailed(Exception):
    """A worker replica died or broke mid-call; ``replica_id`` names it when known."""

    def __init__(self, message: str, replica_id: str | None = None) -> None:
        super().__init__(message)
        self.replica_id = replica_id


@dataclass
class GenerateJob:
    """One validated, tokenized request as a worker replica receives it.

    ``sampling`` holds ``SamplingParams`` keyword arguments already checked by the router.
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any] = field(default_factory=dict)
    priority: int = 0


@dataclass
class Chunk:
    """What one engine step added to one request (a stream of these makes a completion).

    ``finish_reason`` is set on the last chunk only: stop, length, abort, error (the engine failed
    mid-request) or rejected (the engine refused the request); ``error`` says why for the last two.
    Token counts are running totals, so the last chunk carries the usage.
    """

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    timings: dict[str, float] | None = None  # on the last chunk: the engine's RequestOutput.timings
    # On the first chunk of a job whose sampling asked for ``prompt_logprobs``: one entry per prompt
    # token, None for the first, else {the prompt token's id: its logprob, plus the top alternatives}.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ReplicaReport:
    """A worker replica's load and counters, piggy-backed on its streams and used for routing and
    metrics (vLLM's meanings)."""

    replica_id: str
    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Tokens per engine step: non-cumulative counts over ITERATION_TOKENS_BUCKETS (+Inf last), and
    # their sum; empty from a replica that does not report them.
    iteration_tokens: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    # Speculative decoding's counters (SpeculativeStats.counts()): drafts, draft tokens, accepted
    # tokens, then accepted per draft position; empty from a replica that does not speculate.
    spec_decode: tuple[int, ...] = ()


# A replica's stream: ``(index, Chunk)`` for the index-th job of the call, and ``(-1, report)``
# first (so the caller learns which replica it reached) and last (its load after the call).
StreamItem = tuple[int, Union[Chunk, ReplicaReport]]
