"""The draft-model proposer of speculative decoding: a smaller model, or the target itself
quantized ("self-speculation"), that drafts greedily.

It keeps its own paged K/V tensors over the target's block tables: the same block size and number
of blocks, so a block id names both models' K/V for the same positions and one block pool (the
KVCacheManager's) accounts for both. ``Sequence.draft_computed`` counts the tokens whose draft K/V is
written; a proposal first catches the draft up on the tokens it has not seen (the prompt, the
tokens accepted last step), then decodes its drafts one position at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kubeinfer.worker.kernels.backend import select_backend
from kubeinfer.worker.kv_cache import KVCacheManager
from kubeinfer.worker.kv_sizing import kv_bytes_per_token
from kubeinfer.worker.model_runner import ModelRunner
from kubeinfer.worker.models.loader import LoadedModel, load_model
from kubeinfer.worker.scheduler import ScheduledBatch
from kubeinfer.worker.sequence import Sequence


# A catch-up of at most this many tokens runs as decode rows (each attending to the cache up to
# itself), like a verification; a longer one (a new prompt) as a prefill chunk. On a CPU the prefill
# path of a quantized linear dequantizes the whole weight, which a few rows never pay back.
DECODE_ROWS_MAX = 8


@dataclass
class _View:
    """What ModelRunner.prepare reads of a sequence, as the draft model sees it: the tokens it has
    seen or drafted, how many of them have draft K/V, and (laid out as decode rows) the rest."""

    token_ids: list[int]
    num_computed_tokens: int
    spec_token_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids) + len(self.spec_token_ids)

    def chunk(self, limit: int) -> int:
        """Lay out the next tokens to run, at most ``limit``; their number."""
        tokens = self.token_ids + self.spec_token_ids
        n = min(len(tokens) - self.num_computed_tokens, limit)
        if 1 < n <= DECODE_ROWS_MAX:  # decode rows: the first on token_ids, the rest as "drafts"
            split = self.num_computed_tokens + 1
            self.token_ids, self.spec_token_ids = tokens[:split], tokens[split:split + n - 1]
        else:
            self.token_ids, self.spec_token_ids = tokens, []
        return n

    def advance(self, n: int, token: int | None) -> None:
        self.token_ids = self.token_ids + self.spec_token_ids
        self.spec_token_ids = []
        self.num_computed_tokens += n
        if token is not None:
            self.token_ids.append(token)


class DraftModel:
    """Owns the draft model's runner (its weights and K/V tensors). Invariant: after ``propose``, a
    sequence's drafts are the draft model's greedy continuation of its tokens, and its
    ``draft_computed`` never exceeds the positions whose draft K/V hold its real tokens."""

    def __init__(self, runner: ModelRunner, kv: KVCacheManager, chunk_tokens: int) -> None:
        self.runner = runner
        self.kv = kv
        self.chunk_tokens = chunk_tokens  # the most tokens of one sequence's catch-up per forward
        # The last proposal caught a sequence up on more than DECODE_ROWS_MAX tokens (a new prompt):
        # its step is no sample of what drafting costs (Speculator.observe_step leaves it out).
        self.caught_up_on_prompt = False

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set ``spec_token_ids`` (up to ``ks[i]`` drafts) on each sequence that has room in the pool."""
        views, room = [], []
        self.caught_up_on_prompt = False
        for seq, k in zip(seqs, ks):
            # Slots for the positions the drafts are written at (the last token's and k - 1 drafts').
            if self.kv.allocate_slots(seq, k):
                views.append(_View(list(seq.token_ids), seq.draft_computed))
                room.append((seq, k))
        if not views:
            return
        drafts: list[list[int]] = [[] for _ in views]
        # Catch up (chunked), then one decode row per view until each has its k drafts.
        while True:
            live = [i for i, (v, (_, k)) in enumerate(zip(views, room))
                    if v.num_computed_tokens < len(v) and len(drafts[i]) < k]
            if not live:
                break
            counts = [views[i].chunk(self.chunk_tokens) for i in live]
            self.caught_up_on_prompt |= max(counts) > DECODE_ROWS_MAX
            batch = ScheduledBatch([views[i] for i in live], counts)
            step = self.runner.prepare(batch, [self.kv.block_ids(room[i][0].request_id) for i in live])
            hidden = self.runner.forward(step)
            # A view whose chunk reaches its end drafts from its last row (rows are laid out in
            # batch order, ``counts`` of them per view, whichever layout).
            ends, done, offset = [], [], 0
            for i, n in zip(live, counts):
                offset += n
                if views[i].num_computed_tokens + n == len(views[i]):
                    ends.append(offset - 1)
                    done.append(i)
            tokens = []
            if done:
                rows = hidden[torch.tensor(ends, dtype=torch.long, device=hidden.device)]
                # The backend's argmax (on a CPU one pass on the kernels' pool): torch's opened an
                # OpenMP region per draft, whose spinning thread slowed the kernels after it.
                tokens = self.runner.backend.greedy_argmax(self.runner.model.compute_logits(rows)).tolist()
            drafted = dict(zip(done, tokens))
            for i, n in zip(live, counts):
                token = drafted.get(i)
                if token is not None:
                    drafts[i].append(token)
                    if len(drafts[i]) == room[i][1]:
                        token = None  # the last draft is never read back
                views[i].advance(n, token)
        for view, (seq, _), proposal in zip(views, room, drafts):
            seq.spec_token_ids = proposal
            seq.draft_computed = min(view.num_computed_tokens, len(seq))  # real tokens' K/V only

    @staticmethod
    def verified(seq: Sequence, old_len: int, proposed: int, accepted: int) -> None:
        """After verification: the draft's K/V stays valid for the accepted drafts it wrote (it wrote
        drafts 1..k-1 as inputs; the k-th it never read back)."""
        seq.draft_computed = min(seq.draft_computed + min(accepted, proposed - 1), old_len + accepted)


def load_draft(config, target: LoadedModel, device: torch.device, max_model_len: int) -> tuple[LoadedModel, object]:
    """The draft model of ``speculative_method="draft"`` and its kernel backend: the checkpoint at
    ``speculative_draft_model``, or (None) the target's own, quantized with
    ``speculative_draft_quantization``. ValueError when it cannot draft for the target: another
    vocabulary, or a context shorter than the target's ``max_model_len``."""
    kv_int8 = config.kv_cache_dtype == "int8"
    backend = select_backend(config.kernel_backend, device, config.torch_dtype, kv_int8=kv_int8,
                             quantization=config.speculative_draft_quantization, compile_decode=False)
    path = config.speculative_draft_model or config.model
    draft = load_model(path, config.torch_dtype, max_model_len, config.speculative_draft_quantization, None,
                       backend=backend)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model {path!r} has a vocabulary of {draft.config.vocab_size} tokens, the "
                         f"target {target.config.vocab_size}: a draft must share the target's tokenizer")
    if draft.config.max_position_embeddings < max_model_len:
        raise ValueError(f"the draft model {path!r} has a context of {draft.config.max_position_embeddings} "
                         f"tokens, shorter than max_model_len {max_model_len}")
    return draft, backend


def draft_block_bytes(config, draft: LoadedModel) -> int:
    """What the draft's K/V add to each KV block (the pool's blocks hold both models')."""
    c = draft.config
    return config.block_size * kv_bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, config.dtype,
                                                  config.kv_cache_dtype)
