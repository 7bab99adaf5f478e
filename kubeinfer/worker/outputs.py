"""What the engine hands back to callers: each step's outputs, and its counters for metrics.

Torch-free, so the router can import it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from kubeinfer.worker.speculative import SpeculativeStats

# Upper bounds of the engine's tokens-per-step histogram (vLLM's ``vllm:iteration_tokens_total``
# buckets); a step larger than the last lands in the +Inf bucket.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class RequestOutput:
    """The progress of one request in one step.

    ``delta_text``/``new_token_ids`` are what this step added (stream them); ``text`` and
    ``output_token_ids`` are everything so far. ``logprobs`` has one ``{token_id: logprob}`` dict per
    new token when the request asked for them; ``prompt_logprobs`` (first output only) one per prompt
    token, ``None`` for the first. ``finish_reason`` is set exactly when ``finished``.
    ``timings`` is set on the finished output only: the request's phases in seconds, on the engine's
    own clock (vLLM's meanings): ``queue`` (arrival to first scheduled), ``prefill`` (first scheduled
    to first token), ``decode`` (first token to last), ``inference`` (first scheduled to last token).
    A phase the request never reached (aborted while waiting) is absent.
    """

    request_id: str
    new_token_ids: list[int]
    delta_text: str
    text: str
    output_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # on the first output of a request that asked
    error: str | None = None
    timings: dict[str, float] | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


@dataclass
class IterationTokens:
    """A histogram of tokens per engine step over ``ITERATION_TOKENS_BUCKETS``: ``counts[i]`` steps
    fell in bucket i (not cumulative; the last entry is +Inf), ``total`` is the sum of all steps'
    tokens. Only grows."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))
    total: int = 0

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
        self.total += num_tokens


@dataclass
class EngineStats:
    """Counters and gauges for metrics (vLLM's names where the concept is shared).

    Prefix-cache figures are in tokens: a request is one query of its prompt's length when it is
    first admitted, and its hits are the prompt tokens the cache served then.
    """

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    computed_tokens: int       # tokens run through the model (prefix-cache hits are not)
    num_steps: int
    iteration_tokens: IterationTokens = field(default_factory=IterationTokens)
    speculative: SpeculativeStats = field(default_factory=SpeculativeStats)
