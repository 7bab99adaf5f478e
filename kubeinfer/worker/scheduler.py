"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from kubeinfer.worker.kv_cache import KVCacheManager
from kubeinfer.worker.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The plan for one step: ``seqs[i]`` computes its next ``num_new_tokens[i]`` tokens.

    Decodes (one new token) come first, then prefill chunks, so the runner can attend over the
    decodes as one batched call.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


def _order(seq: Sequence) -> tuple[int, float]:
    return (seq.priority, seq.arrival_time)


class Scheduler:
    """Token-budget scheduler over a waiting queue and a running set.

    Each step first gives every running sequence its next tokens (a decode, or the next prefill
    chunk), then admits waiting sequences while the token budget, ``max_num_seqs`` and free blocks
    allow. When a running sequence needs a block and none is free, the running sequence that would
    be served last (lowest priority, then newest) is preempted: its blocks are freed and it goes back
    to the waiting queue to be recomputed. Invariants: both queues stay sorted by (priority, arrival);
    a sequence is in exactly one of them until it finishes; since the engine refuses requests longer
    than the pool, a sequence alone always fits, so nothing starves for ever.
    """

    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.kv.forget(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids.clear()
        seq.draft_computed = 0  # its blocks, and the draft model's K/V in them, are gone
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes: list[tuple[Sequence, int]] = []
        prefills: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.spec_token_ids:  # the last token plus the drafts, as far as the budget goes
                del seq.spec_token_ids[budget - 1:]
            n = min(len(seq) - seq.num_computed_tokens + len(seq.spec_token_ids), budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running[-1]
                if id(victim) in scheduled:
                    victim = None  # everything behind us already got its tokens this step
                if victim is None or victim is seq:
                    self._preempt(seq)
                    preempted.append(seq)
                    seq = None
                    break
                self._preempt(victim)
                preempted.append(victim)
            if seq is None:
                continue  # running[i] now holds the next sequence
            (decodes if n == 1 or seq.spec_token_ids else prefills).append((seq, n))  # drafts: decode rows
            scheduled.add(id(seq))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq in preempted:
                break  # do not re-admit in the step that evicted it: that would thrash
            # A request scoring its prompt needs the logits of every prompt position: no cached prefix.
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 and not seq.scoring_prompt else []
            remaining = len(seq) - seq.num_computed_tokens - len(cached) * self.kv.block_size
            if remaining > budget and not self.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            if not self.kv.allocate_slots(seq, n, cached):
                break
            self.waiting.pop(0)
            if seq.scheduled_time is None:
                seq.scheduled_time = time.monotonic()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(cached) * self.kv.block_size
                self.kv.record_prefix_lookup(len(seq), seq.num_cached_tokens)
            seq.num_computed_tokens += len(cached) * self.kv.block_size
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_order)
            (decodes if n == 1 else prefills).append((seq, n))
            budget -= n

        batch = ScheduledBatch()
        for seq, n in decodes + prefills:
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        return batch

    def update(self, batch: ScheduledBatch) -> list[Sequence]:
        """Advance computed counts after the forward pass; returns the sequences that must sample."""
        ready = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            # Drafts are not computed tokens until accepted (the engine adds those it accepts).
            seq.num_computed_tokens += n - len(seq.spec_token_ids)
            self.kv.cache_computed_blocks(seq)
            if seq.num_computed_tokens == len(seq):
                ready.append(seq)
        return ready
