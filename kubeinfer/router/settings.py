"""The router's settings: pure data, so `kubeinfer serve`, the Serve application and the operator
all read the one definition (``kubeinfer.serve.config.AppConfig`` carries it)."""

from __future__ import annotations

from dataclasses import dataclass

from kubeinfer.router.policies import POLICIES

POLICY_NAMES = tuple(POLICIES)

# A generous bound on the characters one token stands for (real text averages about 4), so a prompt
# longer than this times the context cannot fit and is refused before it is tokenized.
PROMPT_CHARS_PER_TOKEN = 32


@dataclass
class RouterSettings:
    """The router's behaviour: replica policy, admission bounds, micro-batching and deadlines.

    ``batch_window_ms`` 0 turns micro-batching off (each request goes to a replica on its own);
    ``max_in_flight`` requests run on replicas at once (None: the replicas' capacity, their
    ``max_num_seqs`` summed at the most replicas autoscaling may start, and at least
    ``MIN_IN_FLIGHT``: a fixed bound under the fleet's capacity would leave replicas' batch slots
    idle while requests wait here); ``max_queued`` requests may wait beyond that before new ones get
    RESOURCE_EXHAUSTED / HTTP 429 (None: twice the replicas' capacity); a queued request
    still waiting after ``max_queue_wait_s`` gets the same answer. ``request_timeout_s`` is the
    deadline applied when a client sends none.

    ``max_capacity_wait_s`` bounds how long an admitted request's call may wait to reach a replica
    (a model scaled to zero waits while Serve starts one; the request's deadline bounds it too):
    past it the request gets UNAVAILABLE / HTTP 503 with a retry hint. How many may wait is the
    admission bounds' (``max_in_flight`` + ``max_queued``).

    Bounds checked before any work: ``max_prompt_chars`` (None: ``PROMPT_CHARS_PER_TOKEN`` times
    the largest ``max_model_len``) for a prompt or the chat messages together, and
    ``max_body_bytes`` (None: room for such a prompt JSON-escaped, plus 1 MiB) for an HTTP body or
    a gRPC message; ``max_n`` for the choices one request may ask for (``n``: each choice is an
    engine job of its own, admitted like a request).
    """

    policy: str = "power_of_two"
    max_in_flight: int | None = None
    max_queued: int | None = None
    max_queue_wait_s: float = 30.0
    max_prompt_chars: int | None = None
    max_body_bytes: int | None = None
    batch_window_ms: float = 0.0
    max_batch_size: int = 8
    request_timeout_s: float = 600.0
    num_replicas: int = 1
    max_n: int = 16
    max_capacity_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"router policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        if (self.max_in_flight is not None and self.max_in_flight < 1) or \
                (self.max_queued is not None and self.max_queued < 0):
            raise ValueError("need max_in_flight >= 1 and max_queued >= 0")
        if not self.max_queue_wait_s > 0:
            raise ValueError("need max_queue_wait_s > 0")
        if any(v is not None and v < 1 for v in (self.max_prompt_chars, self.max_body_bytes)):
            raise ValueError("need max_prompt_chars >= 1 and max_body_bytes >= 1")
        if self.batch_window_ms < 0 or self.max_batch_size < 1:
            raise ValueError("need batch_window_ms >= 0 and max_batch_size >= 1")
        if self.request_timeout_s <= 0 or self.num_replicas < 1:
            raise ValueError("need request_timeout_s > 0 and num_replicas >= 1")
        if self.max_n < 1:
            raise ValueError("need max_n >= 1")
        if not self.max_capacity_wait_s > 0:
            raise ValueError("need max_capacity_wait_s > 0")

    def prompt_char_limit(self, max_model_len: int) -> int:
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len

    def body_byte_limit(self, max_model_len: int) -> int:
        # A character may take 6 bytes JSON-escaped (a backslash-u escape); the rest of a body is small.
        return self.max_body_bytes or 6 * self.prompt_char_limit(max_model_len) + (1 << 20)
