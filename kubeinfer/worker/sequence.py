"""Per-request state: the tokens so far and how many of them are in the KV cache."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kubeinfer.worker.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_tokens or the model's context length
    ABORT = "abort"        # cancelled by the caller
    ERROR = "error"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    Owns ``token_ids`` (prompt followed by generated tokens) and ``num_computed_tokens``, the prefix of
    ``token_ids`` whose K/V are already in the paged cache. ``spec_token_ids`` are drafts that follow
    ``token_ids`` (only while the sequence is decoding: ``num_computed_tokens == len - 1``). Invariants: ``0 <= num_computed_tokens <=
    len(token_ids)``; a sequence is ready to sample exactly when ``num_computed_tokens`` reaches
    ``len(token_ids)`` after a step; preemption resets ``num_computed_tokens`` to 0 (recompute) and keeps
    the tokens, so no generated token is ever lost.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache at first scheduling
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    scheduled_time: float | None = None   # when the scheduler first admitted it (monotonic clock)
    first_token_time: float | None = None
    # With params.prompt_logprobs: one entry per prompt token scored so far ({token: logprob, ...};
    # the first token has none, so the list starts as [None]).
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # Draft tokens to verify in the next step (speculative.py); never part of token_ids until accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    # The chance a draft is accepted after the ones before it (a moving average; None until the
    # speculator first looks at this sequence, which starts it from the engine's rate).
    spec_acceptance: float | None = None
    draft_computed: int = 0         # tokens whose draft-model K/V are written (draft_model.py)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def scoring_prompt(self) -> bool:
        """Prompt logprobs still to compute: every prompt position must run (no prefix-cache hit)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def priority(self) -> int:
        return self.params.priority
