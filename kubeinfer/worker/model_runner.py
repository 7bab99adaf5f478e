"""Turns a scheduled batch into model inputs, runs the forward pass and samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kubeinfer.worker.huge_pages import huge_zeros
from kubeinfer.worker.kernels.attention import LayerKVCache
from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs
from kubeinfer.worker.models.config import ModelConfig
from kubeinfer.worker.models.llama import LlamaForCausalLM
from kubeinfer.worker.sampling import Sampler, SamplerOutput, SamplingBatch, make_generator
from kubeinfer.worker.scheduler import ScheduledBatch

# Prompt positions scored per logits pass: bounds the fp32 [rows, vocab] buffer of a long prompt.
SCORE_ROWS_PER_PASS = 256


@dataclass
class PromptScoring:
    """Rows of a step's hidden states to score against the known next token (prompt logprobs):
    ``rows`` index the step's flattened tokens, ``targets`` are the tokens that follow them."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    top_k: int = 0
    owners: list = field(default_factory=list)  # (owner, number of rows), in row order: the engine's bookkeeping


@dataclass
class PromptScores:
    """Host lists, one item per scored row: the target's logprob and the top-k (ids, logprobs)."""

    logprobs: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass
class StepOutput:
    sampled: SamplerOutput | None = None
    scores: PromptScores | None = None


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, kv_int8: bool,
                       device: torch.device) -> list[LayerKVCache]:
    """One ``[kv_heads, num_blocks, block_size, head_dim]`` K and V per layer (heads first: see
    kernels/attention.py), plus fp32 scales ``[kv_heads, num_blocks, block_size]`` for an int8 cache.
    Their bytes are exactly ``kv_sizing.kv_bytes_per_token * block_size * num_blocks``."""
    shape = (config.num_kv_heads, num_blocks, block_size, config.head_dim)
    if device.type == "cpu" and not kv_int8:  # advised before first touch (worker/huge_pages.py)
        return [LayerKVCache(huge_zeros(shape, dtype), huge_zeros(shape, dtype)) for _ in range(config.num_layers)]
    if kv_int8:
        return [LayerKVCache(torch.zeros(shape, dtype=torch.int8, device=device),
                             torch.zeros(shape, dtype=torch.int8, device=device),
                             torch.zeros(shape[:-1], device=device), torch.zeros(shape[:-1], device=device))
                for _ in range(config.num_layers)]
    return [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)]


class ModelRunner:
    """Owns the model, its kernel backend, the paged K/V tensors, the sampler and (on CUDA) the
    decode steps' CUDA graphs.

    Block ids come from the KVCacheManager. A step's host-side inputs are built here once
    (``StepInputs``); the backend turns them into the tensors its kernels read. A step synchronises
    with the device once, when the engine reads the sampled ids.
    """

    def __init__(self, model: LlamaForCausalLM, backend: KernelBackend, num_blocks: int, block_size: int,
                 max_model_len: int, kv_int8: bool = False, compile_decode: bool = False, seed: int | None = None) -> None:
        self.model = model
        self.backend = backend
        self.device = backend.device
        backend.configure_cache(block_size, max_model_len)
        # Only decode-only steps are compiled: they always take the same path (no prefill chunks),
        # so one dynamic-shape graph serves every batch size and context length.
        self._decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = model.config.vocab_size
        self.kv_caches = allocate_kv_caches(model.config, num_blocks, block_size, backend.dtype, kv_int8,
                                            self.device)
        self.sampler = Sampler(backend.greedy_argmax, full_vocab_filters=self.device.type == "cuda",
                               generator=make_generator(seed, self.device), sample_rows=backend.sample_rows)
        self.graphs = None  # DecodeGraphs, set by capture_cuda_graphs

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        """Capture decode steps of up to ``max_batch_size`` sequences (CUDA, a backend whose decode
        kernels read no host state); steps that do not fit run eagerly."""
        from kubeinfer.worker.cuda_graphs import DecodeGraphs
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, max_batch_size,
                                   -(-self.max_model_len // self.block_size))

    def prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepInputs:
        """Flatten the batch on the host: token ids, positions, slots and the attention layout."""
        bs = self.block_size
        step = StepInputs()
        input_ids, positions, slots = step.input_ids, step.positions, step.slots
        for seq, n, table in zip(batch.seqs, batch.num_new_tokens, block_tables):
            start = seq.num_computed_tokens
            if n == 1 or seq.spec_token_ids:
                # Decode rows: the last token, then (speculating) each draft as a row of its own that
                # attends to the cache up to itself. Every row's K/V is written before attention
                # runs, so the decode kernels verify drafts with no prefill path.
                for p, token in enumerate([seq.token_ids[start], *seq.spec_token_ids], start):
                    input_ids.append(token)
                    positions.append(p)
                    slots.append(table[p // bs] * bs + p % bs)
                    step.decode_tables.append(table)
                    step.decode_lens.append(p + 1)
                    step.seq_tables.append(table)
                    step.query_lens.append(1)
                    step.context_lens.append(p + 1)
            else:
                offset = len(input_ids)
                input_ids.extend(seq.token_ids[start:start + n])
                positions.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                step.prefills.append((offset, offset + n, start, start + n, table))
                step.seq_tables.append(table)
                step.query_lens.append(n)
                step.context_lens.append(start + n)
            if start + n >= len(seq):  # one row, or one per draft plus the bonus position
                step.sample_rows.extend(range(len(input_ids) - 1 - len(seq.spec_token_ids), len(input_ids)))
        return step

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]], sampling: SamplingBatch | None,
                scoring: PromptScoring | None = None) -> StepOutput:
        """Run the forward pass; sample one token for each sequence whose prompt is now complete and
        score the ``scoring`` rows (prompt logprobs) from the same hidden states."""
        step = self.prepare(batch, block_tables)
        hidden = self.forward(step)
        out = StepOutput(scores=self.score(hidden, scoring) if scoring is not None and scoring.rows else None)
        if sampling is None or not step.sample_rows:
            return out
        rows = hidden if len(step.sample_rows) == hidden.shape[0] else \
            hidden[torch.tensor(step.sample_rows, dtype=torch.long).to(self.device, non_blocking=True)]
        # A plain-greedy step takes its argmax of the head's own output: widening [B, vocab] bf16
        # logits to fp32 is a full extra pass over them, every step.
        logits = self.model.compute_logits(rows, widen=not sampling.plain_greedy)
        out.sampled = self.sampler(logits, sampling)
        return out

    def score(self, hidden: torch.Tensor, scoring: PromptScoring) -> PromptScores:
        """The raw model's logprob of each target (no sampling transforms, as vLLM reports them)."""
        logprobs, top_ids, top_logprobs = [], [], []
        for lo in range(0, len(scoring.rows), SCORE_ROWS_PER_PASS):
            index = torch.tensor(scoring.rows[lo:lo + SCORE_ROWS_PER_PASS], dtype=torch.long, device=self.device)
            targets = torch.tensor(scoring.targets[lo:lo + SCORE_ROWS_PER_PASS], dtype=torch.long, device=self.device)
            lp = torch.log_softmax(self.model.compute_logits(hidden[index], widen=True), dim=-1)
            logprobs += lp.gather(1, targets[:, None])[:, 0].tolist()
            if scoring.top_k:
                values, ids = lp.topk(scoring.top_k, dim=-1)
                top_ids += ids.tolist()
                top_logprobs += values.tolist()
        return PromptScores(logprobs, top_ids, top_logprobs)

    def forward(self, step: StepInputs) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of the step's tokens: a captured graph for a decode step that
        fits one, else eagerly."""
        if self.graphs is not None and not step.prefills:
            out = self.graphs.run(step)
            if out is not None:
                return out
        dev = self.device
        meta = self.backend.attention_metadata(step, self.kv_caches)
        input_ids = torch.tensor(step.input_ids, dtype=torch.long).to(dev, non_blocking=True)
        positions = torch.tensor(step.positions, dtype=torch.long).to(dev, non_blocking=True)
        forward = self.model if step.prefills else self._decode_forward
        return forward(input_ids, positions, self.kv_caches, meta)
