"""The batched sampler that turns logits into next tokens, for requests' SamplingParams."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from kubeinfer.worker.sampling_params import SamplingParams

# Smaller temperatures are raised to this: dividing by, say, 1e-30 overflows logits to inf and
# softmax to NaN, while 1e-5 is already indistinguishable from greedy.
MIN_TEMPERATURE = 1e-5
TOP_P_CANDIDATES = 256  # top-p first looks for each nucleus among this many best tokens


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG seeded with ``seed`` (a request's own, or the engine's for its unseeded rows), or None."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class SamplingBatch:
    """One engine step's sampling inputs, as batched tensors plus flags that let the sampler skip work.

    Owns per-row tensors on ``device`` (length B). Neutral values stand in for rows that do not use
    a feature (penalties 1/0/0; for greedy rows also temperature 1, top_k 0, top_p 1, min_p 0), so
    a feature is applied to the whole batch whenever its ``any_*`` flag is set. Penalty tensors
    (``seen_mask``, ``output_counts``) are built only when some row needs them.
    """

    vocab_size: int
    greedy: Tensor                       # [B] bool
    all_greedy: bool
    any_greedy: bool
    temperature: Tensor                  # [B] float32
    top_k: Tensor | None                 # [B] long (0 = off), set iff any_top_k
    top_p: Tensor | None                 # [B] float32, set iff any_top_p
    min_p: Tensor | None                 # [B] float32, set iff any_min_p
    repetition_penalty: Tensor | None    # [B] float32, set iff any row has one != 1
    seen_mask: Tensor | None             # [B, V] bool: token occurs in prompt + output
    presence_penalty: Tensor | None      # [B] float32, set iff presence or frequency penalties are used
    frequency_penalty: Tensor | None
    output_counts: Tensor | None         # [B, V] float32: occurrences in the output so far
    seeded: list[tuple[int, torch.Generator]]  # non-greedy rows with their own RNG
    any_unseeded_random: bool
    max_logprobs: int | None             # largest `logprobs` asked for, None when no row asked
    max_top_k: int = 0                   # largest top_k of a sampled row (read on the host, no sync)
    token_bitmask: Tensor | None = None  # [B, ceil(V/32)] int32 grammar masks (structured output), or None
    bitmask_rows: list[int] | None = None  # the rows token_bitmask applies to (the constrained ones)
    logit_bias: tuple[Tensor, Tensor, Tensor] | None = None  # (rows, token ids, values), set iff a row has one

    @property
    def plain_greedy(self) -> bool:
        """Every row takes its argmax of the raw logits: no penalties, no logprobs. The sampler then
        needs the logits in no particular float dtype (the argmax of bf16 logits is that of their
        fp32 widening)."""
        return self.all_greedy and not self.adjusts_logits and self.max_logprobs is None

    @property
    def adjusts_logits(self) -> bool:
        """Some row's logits change before sampling: a grammar mask, a penalty or a logit bias."""
        return self.token_bitmask is not None or self.any_penalty or self.logit_bias is not None

    @property
    def any_penalty(self) -> bool:
        return self.repetition_penalty is not None or self.presence_penalty is not None

    @property
    def any_top_k(self) -> bool:
        return self.top_k is not None

    @property
    def any_top_p(self) -> bool:
        return self.top_p is not None

    @property
    def any_min_p(self) -> bool:
        return self.min_p is not None

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]],
              generators: list[torch.Generator | None], vocab_size: int,
              device: torch.device | str = "cpu") -> "SamplingBatch":
        """``vocab_size`` is the logits' last dimension; ``generators[i]`` is row i's (or None)."""
        n = len(params)
        if not (len(prompt_ids) == len(output_ids) == len(generators) == n):
            raise ValueError("params, prompt_ids, output_ids and generators must have one entry per row")

        def col(values, dtype=torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy_rows = [p.greedy for p in params]
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        any_rep = any(r != 1.0 for r in rep)
        any_pres_freq = any(pres) or any(freq)
        sampled = [i for i in range(n) if not greedy_rows[i]]
        asked = [p.logprobs for p in params if p.logprobs is not None]

        biased = [(i, t, v) for i, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
        if any(t >= vocab_size for _, t, _ in biased):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size})")
        seen_mask = output_counts = None
        if any_rep:
            seen_mask = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            for token_lists in (prompt_ids, output_ids):
                rows, ids = _flatten(token_lists, device)
                seen_mask[rows, ids] = True
        if any_pres_freq:
            output_counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            rows, ids = _flatten(output_ids, device)
            output_counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)

        # Filters are only worth applying when a sampled (non-greedy) row uses them.
        any_top_k = any(params[i].top_k > 0 for i in sampled)
        any_top_p = any(params[i].top_p < 1 for i in sampled)
        any_min_p = any(params[i].min_p > 0 for i in sampled)
        return cls(
            vocab_size=vocab_size,
            greedy=col(greedy_rows, torch.bool),
            all_greedy=not sampled,
            any_greedy=len(sampled) < n,
            temperature=col([max(p.temperature, MIN_TEMPERATURE) if p.temperature > 0 else 1.0 for p in params]),
            top_k=col([0 if p.greedy else min(p.top_k, vocab_size) for p in params], torch.long)
            if any_top_k else None,
            top_p=col([1.0 if p.greedy else p.top_p for p in params]) if any_top_p else None,
            min_p=col([0.0 if p.greedy else p.min_p for p in params]) if any_min_p else None,
            repetition_penalty=col(rep) if any_rep else None,
            seen_mask=seen_mask,
            presence_penalty=col(pres) if any_pres_freq else None,
            frequency_penalty=col(freq) if any_pres_freq else None,
            output_counts=output_counts,
            seeded=[(i, generators[i]) for i in sampled if generators[i] is not None],
            any_unseeded_random=any(generators[i] is None for i in sampled),
            max_logprobs=max(asked) if asked else None,
            max_top_k=max([min(params[i].top_k, vocab_size) for i in sampled], default=0),
            logit_bias=(col([r for r, _, _ in biased], torch.long), col([t for _, t, _ in biased], torch.long),
                        col([v for _, _, v in biased])) if biased else None,
        )


def _flatten(rows: list[list[int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs for every token, as two 1-D tensors, without a per-token Python loop."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    return row_idx.to(device), ids.to(device)


def apply_penalties(logits: Tensor, *, seen_mask: Tensor | None = None,
                    repetition_penalty: Tensor | None = None, output_counts: Tensor | None = None,
                    presence_penalty: Tensor | None = None, frequency_penalty: Tensor | None = None) -> Tensor:
    """vLLM's penalties on [B, V] logits; returns a new tensor.

    Repetition (tokens in prompt + output): positive logits are divided by the penalty, negative
    ones multiplied. Then ``logit -= frequency * count + presence * (count > 0)`` over output counts.
    """
    if repetition_penalty is not None and seen_mask is not None:
        rp = repetition_penalty.unsqueeze(1)
        logits = torch.where(seen_mask, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if output_counts is not None:
        if frequency_penalty is not None:
            logits = logits - frequency_penalty.unsqueeze(1) * output_counts
        if presence_penalty is not None:
            logits = logits - presence_penalty.unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, max_top_k: int | None = None,
                      full_vocab: bool = False) -> Tensor:
    """Mask (to -inf, in place) tokens outside each row's top-k and outside its top-p nucleus.

    Per row, ``top_k`` 0 and ``top_p`` 1 mean off. Top-p applies to the distribution top-k leaves
    and keeps the smallest set of most likely tokens whose probability reaches p (at least one).
    Each filter becomes a logit threshold, so tokens tied with the last one kept are kept too.
    ``max_top_k`` (the largest top_k, known on the host) spares reading it from the device;
    ``full_vocab`` ranks the whole vocabulary at once (a GPU sorts it fast, and reading back whether
    a narrower search sufficed would cost a host sync).
    """
    vocab = logits.shape[1]
    k = (top_k if top_k is not None else logits.new_zeros(len(logits), dtype=torch.long)).unsqueeze(1)
    p = top_p.unsqueeze(1) if top_p is not None else None
    if full_vocab:
        return logits.masked_fill_(logits < _filter_threshold(logits, k, p, vocab), -math.inf)
    if max_top_k is None:
        max_top_k = int(k.max())
    # A full sort of the vocabulary is slow on CPU (~25x a top-256 of 150k logits), and a nucleus
    # is nearly always narrow: look for it among the best TOP_P_CANDIDATES first.
    m = min(vocab, max(max_top_k, TOP_P_CANDIDATES if p is not None else 1))
    threshold = _filter_threshold(logits, k, p, m)
    if threshold is None:
        threshold = _filter_threshold(logits, k, p, vocab)
    return logits.masked_fill_(logits < threshold, -math.inf)


def _filter_threshold(logits: Tensor, k: Tensor, p: Tensor | None, m: int) -> Tensor | None:
    """[B, 1] lowest logit each row keeps, from its m best; None if a nucleus may extend past them."""
    best = logits.topk(m, dim=-1).values  # descending
    threshold = torch.where(k > 0, best.gather(1, (k - 1).clamp(min=0)), -math.inf)
    if p is None:
        return threshold
    best = best.masked_fill(best < threshold, -math.inf)
    # Top-k rows have all their remaining mass in `best`; other rows normalise over the whole row.
    lse = torch.where(k > 0, best.logsumexp(-1, keepdim=True), logits.logsumexp(-1, keepdim=True))
    probs = (best - lse).exp()
    cum = probs.cumsum(-1)
    if m < logits.shape[1] and bool(((cum[:, -1:] < p) & (p < 1) & (k <= 0)).any()):
        return None
    n_keep = ((cum - probs) < p).sum(-1, keepdim=True)  # tokens whose better-ranked mass is below p
    return torch.maximum(threshold, torch.where(p < 1, best.gather(1, n_keep - 1), -math.inf))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask (in place) tokens whose probability is below ``min_p`` times the row's top probability."""
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p); log(0) = -inf masks nothing.
    threshold = logits.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(1)
    return logits.masked_fill_(logits < threshold, -math.inf)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Per row of ``probs`` [B, V], the first column whose cumulative probability (in column order)
    passes ``uniforms`` [B] times the row's total: P(column) = its probability, from one uniform per
    row. A column of probability 0 is never drawn (u rounding up to the total gives the last positive)."""
    cum = probs.double().cumsum(-1)
    total = cum[:, -1:]
    picked = (cum <= uniforms.unsqueeze(1) * total).sum(-1)
    return torch.minimum(picked, (cum < total).sum(-1))


def first_max(logits: Tensor) -> Tensor:
    """Greedy token per row: ``max``'s indices follow argmax's rule (the first maximum, NaN wins)
    and cost less than ``argmax`` on a CPU, every decode step."""
    return logits.max(dim=-1).indices


def _adjusted(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """fp32 logits with the constrained rows' grammar masks, the penalties and the logit biases
    applied (a new tensor: the caller's is never modified)."""
    widened = logits.float()
    if batch.token_bitmask is not None:
        from kubeinfer.worker.structured_output import apply_bitmask  # only constrained batches need xgrammar
        widened = widened if widened is not logits else logits.clone()
        apply_bitmask(widened, batch.token_bitmask, batch.bitmask_rows)
    if batch.any_penalty:
        widened = apply_penalties(widened, seen_mask=batch.seen_mask, repetition_penalty=batch.repetition_penalty,
                                  output_counts=batch.output_counts, presence_penalty=batch.presence_penalty,
                                  frequency_penalty=batch.frequency_penalty)
    if batch.logit_bias is not None:
        rows, ids, values = batch.logit_bias
        widened = widened if widened is not logits else logits.clone()
        widened.index_put_((rows, ids), values, accumulate=True)
    return widened


@dataclass
class SamplerOutput:
    """The step's chosen tokens, plus logprobs when any row asked (computed for every row then)."""

    token_ids: Tensor                               # [B] long
    logprobs: Tensor | None = None                  # [B] float32: logprob of the chosen token
    top_logprobs: tuple[Tensor, Tensor] | None = None  # ([B, K] ids, [B, K] logprobs), K = max asked > 0

    def to_host(self) -> "SamplerOutput":
        """Everything on the CPU: the step's one wait for the device (a no-op on a CPU)."""
        if self.token_ids.device.type == "cpu":
            return self
        top = None if self.top_logprobs is None else (self.top_logprobs[0].cpu(), self.top_logprobs[1].cpu())
        return SamplerOutput(self.token_ids.cpu(), None if self.logprobs is None else self.logprobs.cpu(), top)


class Sampler:
    """Stateless: logits [B, V] + SamplingBatch -> SamplerOutput, one batched call per engine step.

    Order, as in vLLM: the grammar mask of constrained rows (structured output: forbidden tokens'
    logits become -inf, so every later step, logprobs included, sees the masked distribution),
    penalties, logit biases, then (greedy rows) argmax, or (other rows) temperature, top-k, top-p, min-p and a draw.
    The draw is an inverse CDF over the row in column order (``inverse_cdf``) with one uniform per
    row; seeded rows take theirs from their own generator, so their tokens do not depend on the rest
    of the batch. Greedy rows take the kernel backend's ``greedy_argmax`` (one C++ pass on a CPU).
    ``sample_rows``, where the backend has one (the C++ kernels), filters and draws in one call with
    the same rules and the same uniforms as the torch path (which runs on a GPU, on the torch
    backend, and whenever logprobs are asked: they need the processed logits). Logits may be fp32 or
    the model's dtype; the torch path widens them to fp32. The caller's logits are never modified.
    ``full_vocab_filters`` (on a GPU) ranks the whole vocabulary for top-k/top-p, so that sampling
    never waits on the device mid-step. ``generator`` (the engine's, seeded from
    ``EngineConfig.seed``) draws for the rows without a seed of their own, so an engine's unseeded
    sampling is reproducible from its start.
    """

    def __init__(self, greedy_argmax: Callable[[Tensor], Tensor] = first_max, full_vocab_filters: bool = False,
                 generator: torch.Generator | None = None,
                 sample_rows: Callable[..., Tensor] | None = None) -> None:
        self._greedy_argmax = greedy_argmax
        self._full_vocab = full_vocab_filters
        self._generator = generator  # draws for rows without a seed of their own (None: torch's global RNG)
        self._sample_rows = sample_rows

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != batch.vocab_size or logits.shape[0] != batch.greedy.shape[0]:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch "
                             f"({batch.greedy.shape[0]} rows, vocab {batch.vocab_size})")
        if batch.plain_greedy:
            return SamplerOutput(self._greedy_argmax(logits))
        if batch.adjusts_logits or batch.max_logprobs is not None:
            logits = _adjusted(logits, batch)
        if batch.all_greedy:
            return self._output(self._greedy_argmax(logits), logits, batch)

        uniforms = self._uniforms(batch, logits.device)
        processed = None
        if self._sample_rows is not None and batch.max_logprobs is None:
            token_ids = self._sample_rows(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, uniforms)
        else:
            logits = logits.float()
            processed = logits / batch.temperature.unsqueeze(1)
            if batch.any_top_k or batch.any_top_p:
                processed = apply_top_k_top_p(processed, batch.top_k, batch.top_p, batch.max_top_k, self._full_vocab)
            if batch.any_min_p:
                processed = apply_min_p(processed, batch.min_p)
            token_ids = inverse_cdf(processed.softmax(dim=-1), uniforms)

        if batch.any_greedy:
            token_ids = torch.where(batch.greedy, self._greedy_argmax(logits), token_ids)
            if processed is not None and batch.max_logprobs is not None:
                processed = torch.where(batch.greedy.unsqueeze(1), logits, processed)
        return self._output(token_ids, processed, batch)

    def _uniforms(self, batch: SamplingBatch, device: torch.device) -> Tensor:
        """[B] float64 in [0, 1): the engine generator's for unseeded rows, each seeded row's own."""
        rows = batch.greedy.shape[0]
        if batch.any_unseeded_random:
            on = self._generator.device if self._generator is not None else device
            uniforms = torch.rand(rows, dtype=torch.float64, generator=self._generator, device=on).to(device)
        else:
            uniforms = torch.zeros(rows, dtype=torch.float64, device=device)
        for row, gen in batch.seeded:
            uniforms[row] = torch.rand((), dtype=torch.float64, generator=gen, device=gen.device).to(device)
        return uniforms

    @staticmethod
    def _output(token_ids: Tensor, final_logits: Tensor | None, batch: SamplingBatch) -> SamplerOutput:
        if batch.max_logprobs is None or final_logits is None:
            return SamplerOutput(token_ids)
        logprobs = final_logits.log_softmax(dim=-1)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        top = None
        if batch.max_logprobs > 0:
            values, ids = logprobs.topk(batch.max_logprobs, dim=-1)
            top = (ids, values)
        return SamplerOutput(token_ids, chosen, top)
