"""What the engine hands back to callers after each step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """The progress of one request in one step.

    ``delta_text``/``new_token_ids`` are what this step added (stream them); ``text`` and
    ``output_token_ids`` are everything so far. ``logprobs`` has one ``{token_id: logprob}`` dict per
    new token when the request asked for them. ``finish_reason`` is set exactly when ``finished``.
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
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)
