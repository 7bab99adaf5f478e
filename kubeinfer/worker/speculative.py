"""Speculative decoding: cheap guesses of a sequence's next tokens, verified by the target model in
one step.

A proposal is a list of draft tokens that would follow ``seq.token_ids``. The engine runs the last
real token plus the drafts as one chunk (the paged-attention prefill path, so continuous batching
is kept), samples every position, and accepts drafts while the sampled token equals the draft; the
first sampled token that differs (or the token after the last draft) is kept too. With a point-mass
proposal (n-gram lookup has no probabilities) this is exactly the rejection-sampling rule of
Leviathan et al.: draft ``d`` is accepted with probability ``p(d)``, and on rejection the token comes
from ``p`` without ``d``. So greedy output is token for token plain greedy's, and sampled output has
the target's distribution. Drafts never enter ``token_ids`` before they are accepted, so prefix-cache
hashes never include an unverified token; the KV slots written for rejected drafts are overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kubeinfer.worker.speculation_budget import (EXPLORE_EVERY, AcceptancePrior, StepCosts, choose_k, expected_tokens,
                                                 explore_k, recover_alpha, update_alpha)

SPECULATIVE_METHODS = ("none", "ngram", "draft")  # "none" (no speculation) is None in EngineConfig
MAX_SPECULATIVE_TOKENS = 16  # drafts per step at most (the metrics' per-position counters are this wide)


def ngram_proposal(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier occurrence of the sequence's
    last ``n`` tokens, trying ``n`` from ``n_max`` down to ``n_min``; [] when nothing matches."""
    length = len(token_ids)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        tail = token_ids[length - n:]
        first = tail[0]
        for i in range(length - n - 1, -1, -1):  # latest first; never the tail itself
            if token_ids[i] == first and token_ids[i:i + n] == tail:
                return token_ids[i + n:i + n + k]
    return []


@dataclass
class SpeculativeStats:
    """Counters with vLLM's meanings (``vllm:spec_decode_*``): proposals made, draft tokens proposed,
    drafts accepted, and accepted drafts per position (index 0 is the first draft token)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def counts(self) -> tuple[int, ...]:
        """Drafts, draft tokens, accepted tokens, then accepted per position (MAX_SPECULATIVE_TOKENS)."""
        per_pos = self.accepted_per_pos + [0] * (MAX_SPECULATIVE_TOKENS - len(self.accepted_per_pos))
        return (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, *per_pos)

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < proposed:
            self.accepted_per_pos += [0] * (proposed - len(self.accepted_per_pos))
        for i in range(accepted):
            self.accepted_per_pos[i] += 1


def accept(drafts: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verified proposal adds: the drafts up to the first one the target did not sample,
    then the target's own token at that position (``sampled`` has one more entry than ``drafts``)."""
    out = []
    for draft, token in zip(drafts, sampled):
        out.append(token)
        if token != draft:
            return out
    out.append(sampled[len(drafts)])
    return out


class Speculator:
    """Decides before each step which decoding sequences draft, and how many tokens; owns the
    proposer (n-gram lookup, or a DraftModel), the measured step costs and the counters.

    How many: per sequence, the k that maximises the step's expected tokens per second, from the
    measured cost of a decode step by its rows and the sequence's acceptance rate
    (speculation_budget.py); zero when drafting does not pay.

    Invariant: drafts are set only on a sequence that is decoding (``num_computed_tokens == len - 1``),
    is not constrained by a grammar and has room for the drafts plus one more token within its
    ``max_tokens`` and the context; none at all in a step with more than
    ``speculative_disable_by_batch_size`` running sequences.
    """

    def __init__(self, config: Any, max_model_len: int, draft: Any = None) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.draft = draft  # a DraftModel for speculative_method "draft"
        self.stats = SpeculativeStats()
        self.costs = StepCosts()
        self.prior = AcceptancePrior()
        self._declined = 0  # proposals declined since the last one verified
        self._explored_at = 0  # costs.steps at the last draft count tried by explore_k

    def propose(self, running: list, constrained: Callable[[Any], bool]) -> None:
        cfg = self.config
        if len(running) > cfg.speculative_disable_by_batch_size:
            return
        chosen, ks = [], []
        rows = len(running)  # every running sequence is a row at least
        tokens = float(rows)
        for seq in running:
            if seq.num_computed_tokens != len(seq) - 1 or constrained(seq):
                continue
            room = min(cfg.num_speculative_tokens, seq.params.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - len(seq) - 1)
            if room <= 0:
                continue
            candidate = None
            if self.draft is None:
                candidate = ngram_proposal(seq.token_ids, room, cfg.prompt_lookup_min, cfg.prompt_lookup_max)
                room = len(candidate)
            if seq.spec_acceptance is None:  # a new sequence starts from the engine's rate
                seq.spec_acceptance = self.prior.alpha
            k = choose_k(self.costs, rows, tokens, seq.spec_acceptance, room)
            if k == 0 and room > 0:
                self._declined += 1
                if self._declined >= EXPLORE_EVERY:
                    k = 1
            stale = explore_k(self.costs, rows, room, self.costs.steps - self._explored_at)
            if stale is not None:  # keep every draft count's price fresh (speculation_budget.explore_k)
                k, self._explored_at = stale, self.costs.steps
            if k == 0:
                seq.spec_acceptance = recover_alpha(seq.spec_acceptance, self.prior.alpha)
                continue
            self._declined = 0
            rows += k
            tokens += expected_tokens(seq.spec_acceptance, k) - 1.0
            if candidate is not None:
                seq.spec_token_ids = candidate[:k]
            else:
                chosen.append(seq)
                ks.append(k)
        if chosen:
            self.draft.propose(chosen, ks)

    @staticmethod
    def decode_rows(batch: Any) -> int | None:
        """A step's rows when every sequence in it decodes (one row, plus its drafts), else None: only
        those steps price a row count (a prefill chunk costs what its length does)."""
        rows = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.num_computed_tokens != len(seq) - 1 or n != 1 + len(seq.spec_token_ids):
                return None
            rows += n
        return rows

    def observe_step(self, rows: int | None, seconds: float) -> None:
        """The wall time of a whole step (proposal included) of ``rows`` decode rows. A step whose
        draft model first caught up on a prompt is left out: it costs what that prefill does, and as
        the first price of its row count it had made those drafts look too dear to be tried again."""
        if rows and not (self.draft is not None and self.draft.caught_up_on_prompt):
            self.costs.observe(rows, seconds)

    def verified(self, seq: Any, old_len: int, proposed: int, accepted: int) -> None:
        """Count one verified proposal and let the proposer keep what stays valid."""
        self.stats.record(proposed, accepted)
        self.prior.update(proposed, accepted)
        seq.spec_acceptance = update_alpha(seq.spec_acceptance, proposed, accepted)
        if self.draft is not None:
            self.draft.verified(seq, old_len, proposed, accepted)

    def snapshot(self) -> SpeculativeStats:
        s = self.stats
        return SpeculativeStats(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, list(s.accepted_per_pos))
