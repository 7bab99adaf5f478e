"""The engine: requests in, tokens out. One ``step()`` = schedule -> execute -> update."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from kubeinfer.worker.auto_dtype import resolve_dtype
from kubeinfer.worker.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from kubeinfer.worker.cpu_budget import fit_torch_threads
from kubeinfer.worker.detokenizer import IncrementalDetokenizer
from kubeinfer.worker.draft_model import DraftModel, draft_block_bytes, load_draft
from kubeinfer.worker.kv_cache import KVCacheManager
from kubeinfer.worker.gpu_memory import GIB, check_free_memory, profile_memory
from kubeinfer.worker.kernels.backend import select_backend
from kubeinfer.worker.kv_sizing import kv_blocks_for_bytes, kv_bytes_per_token
from kubeinfer.worker.model_runner import ModelRunner, PromptScores, PromptScoring
from kubeinfer.worker.models.loader import LoadedModel, finish_model, load_model
from kubeinfer.worker.outputs import EngineStats, IterationTokens, RequestOutput
from kubeinfer.worker.sampling import SamplingBatch, make_generator
from kubeinfer.worker.sampling_params import SamplingParams
from kubeinfer.worker.scheduler import Scheduler
from kubeinfer.worker.sequence import FinishReason, Sequence
from kubeinfer.worker.speculative import SpeculativeStats, Speculator, accept

log = logging.getLogger(__name__)


@dataclass
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    grammar: Any = None  # xgrammar GrammarMatcher of a constrained request (structured_output.py), else None


def _timings(seq: Sequence, now: float) -> dict[str, float]:
    """A finished request's phases (RequestOutput.timings); ``now`` is its end."""
    if seq.scheduled_time is None:
        return {"queue": now - seq.arrival_time}
    out = {"queue": seq.scheduled_time - seq.arrival_time, "inference": now - seq.scheduled_time}
    if seq.first_token_time is not None:
        out["prefill"] = seq.first_token_time - seq.scheduled_time
        out["decode"] = now - seq.first_token_time
    return out


class Engine:
    """Owns the model runner, scheduler, KV-cache manager and the live requests.

    Not thread-safe: call ``add_request``/``abort``/``step`` from one thread (AsyncEngine does).
    A request's bad input is rejected by ``add_request`` with ValueError and never reaches the
    scheduler; a failing step finishes the requests in it with ``finish_reason="error"`` and the
    engine keeps serving the rest.
    """

    def __init__(self, config: EngineConfig | None = None, *, loaded: LoadedModel | None = None, **overrides) -> None:
        config = config or EngineConfig(**overrides)
        device = config.resolve_device()  # a missing GPU is reported before anything is loaded
        self.device = device
        # dtype "auto" becomes a concrete one here, once; everything after reads the resolved config.
        config = dataclasses.replace(config, dtype=resolve_dtype(config, device, loaded))
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        elif device.type == "cpu":
            fit_torch_threads()
        kv_int8 = config.kv_cache_dtype == "int8"
        # The one decision of which kernels run every layer, from (device, dtype, scheme, KV dtype, CPU).
        self.backend = select_backend(config.kernel_backend, device, config.torch_dtype, kv_int8=kv_int8,
                                      quantization=config.quantization, compile_decode=config.compile)
        profile_gpu = device.type == "cuda" and config.num_kv_blocks is None and config.kv_cache_memory_bytes is None
        if profile_gpu:
            check_free_memory(device, config.gpu_memory_utilization)
        if loaded is None:
            loaded = load_model(config.model, config.torch_dtype, config.max_model_len,
                                config.quantization, config.quantization_group_size, backend=self.backend)
        else:  # a model built elsewhere (build_model): give it this backend's packing and kernels
            finish_model(loaded, self.backend)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.model or "builtin://smollm2-135m"
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        if self.max_model_len > loaded.config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context length "
                             f"{loaded.config.max_position_embeddings}")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")
        mc = loaded.config
        block_bytes = config.block_size * kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                                             config.dtype, config.kv_cache_dtype)
        draft = None
        if config.speculative_method == "draft":  # loaded before the pool is sized: its K/V share the blocks
            draft = load_draft(config, loaded, device, self.max_model_len)
            block_bytes += draft_block_bytes(config, draft[0])
        if config.num_kv_blocks:
            num_blocks, source = config.num_kv_blocks, "num_kv_blocks"
        elif profile_gpu:
            profile = profile_memory(loaded.model, self.backend, block_size=config.block_size, kv_int8=kv_int8,
                                     num_tokens=min(config.max_num_batched_tokens, self.max_model_len),
                                     num_sample_rows=config.max_num_seqs, max_model_len=self.max_model_len,
                                     utilization=config.gpu_memory_utilization)
            num_blocks = profile.kv_cache_bytes // block_bytes
            source = (f"gpu_memory_utilization {config.gpu_memory_utilization} of {profile.total / GIB:.1f} GiB, "
                      f"less weights {profile.weights / GIB:.2f} GiB, activations {profile.activation_peak / GIB:.2f}"
                      f" GiB and non-torch {profile.non_torch / GIB:.2f} GiB")
        else:
            memory = config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
            num_blocks, source = kv_blocks_for_bytes(memory, block_bytes // config.block_size, config.block_size), \
                "kv_cache_memory_bytes"
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of "
                f"{config.block_size}; {source}), fewer than max_model_len={self.max_model_len}: give it more "
                "memory (kv_cache_memory_bytes / num_kv_blocks / gpu_memory_utilization) or lower max_model_len")
        self.num_kv_blocks = num_blocks
        self.kv_cache_bytes = num_blocks * block_bytes
        log.info("KV cache on %s: %d blocks of %d tokens, %.2f GiB (%s); at max_model_len %d it holds %.1f "
                 "requests at once; kernels: %s", device, num_blocks, config.block_size, self.kv_cache_bytes / GIB,
                 source, self.max_model_len, num_blocks * config.block_size / self.max_model_len, self.backend.name)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   enable_chunked_prefill=config.enable_chunked_prefill)
        self.runner = ModelRunner(loaded.model, self.backend, num_blocks, config.block_size, self.max_model_len,
                                  kv_int8, compile_decode=config.compile, seed=config.seed)
        if device.type == "cuda" and self.backend.supports_cuda_graphs and not config.enforce_eager:
            self.runner.capture_cuda_graphs(config.max_num_seqs)
        self.requests: dict[str, _Request] = {}
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._num_steps = 0
        self._computed_tokens = 0
        self._iteration_tokens = IterationTokens()
        self.speculator = None
        if config.speculative_method is not None:
            drafter = None if draft is None else DraftModel(
                ModelRunner(draft[0].model, draft[1], num_blocks, config.block_size, self.max_model_len, kv_int8),
                self.kv, config.max_num_batched_tokens)
            self.speculator = Speculator(config, self.max_model_len, drafter)
        self._structured = None  # StructuredOutput, made on the first constrained request
        self._num_constrained = 0  # live requests with a grammar: 0 keeps the step free of grammar work
        self._num_scoring = 0  # live requests asking for prompt logprobs: 0 keeps the step free of that work

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str | None = None, prompt: str | None = None,
                    params: SamplingParams | None = None, *, prompt_token_ids: list[int] | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError (naming the problem) for anything that cannot run."""
        request_id = request_id or uuid.uuid4().hex
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("give a prompt string or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        prompt_token_ids = list(prompt_token_ids)
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                             f"{self.max_model_len} tokens, which must also leave room for at least one output token")
        grammar = self._grammar_matcher(params) if params.structured_output is not None else None
        seq = Sequence(request_id, prompt_token_ids, params)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
        self.requests[request_id] = _Request(seq, detok, make_generator(params.seed, self.device), grammar)
        self._num_constrained += grammar is not None
        self._num_scoring += seq.prompt_logprobs is not None
        self.scheduler.add(seq)
        self._prompt_tokens += len(prompt_token_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is not (or no longer) live."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self._num_constrained -= req.grammar is not None
        self._num_scoring -= req.seq.prompt_logprobs is not None
        req.seq.finish_reason = FinishReason.ABORT
        self.scheduler.remove(req.seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration and return the requests that produced tokens or finished."""
        started = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, lambda seq: self.requests[seq.request_id].grammar is not None)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        decode_rows = self.speculator.decode_rows(batch) if self.speculator is not None else None
        self._num_steps += 1
        self._computed_tokens += batch.num_tokens
        self._iteration_tokens.observe(batch.num_tokens)
        # Sequences whose prompt (or recompute) completes this step sample a token; the runner emits
        # their logits in batch order, the same order Scheduler.update returns them in.
        sampling_rows = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n >= len(s)]
        tables = [self.kv.block_ids(s.request_id) for s in batch.seqs]
        scoring = self._prompt_scoring(batch) if self._num_scoring else None
        try:
            sampling = self._sampling_batch(sampling_rows) if sampling_rows else None
            step = self.runner.execute(batch, tables, sampling, scoring)
        except Exception as e:  # a bug or resource failure must not take the other requests down
            log.exception("engine step failed")
            return [self._finish(s, FinishReason.ERROR, error=f"{type(e).__name__}: {e}") for s in batch.seqs]
        if step.scores is not None:
            self._store_prompt_scores(scoring, step.scores)
        ready = self.scheduler.update(batch)
        outputs = []
        if step.sampled is None:
            return outputs
        result = step.sampled.to_host()
        token_ids = result.token_ids.tolist()
        now = time.monotonic()
        row = 0
        for seq in ready:
            if not seq.spec_token_ids:
                outputs.append(self._append_token(seq, token_ids[row], row, result, now))
                row += 1
            else:
                outputs.append(self._verify(seq, token_ids, row, result, now))
                row += 1 + len(seq.spec_token_ids)
                seq.spec_token_ids = []
        if decode_rows:  # what a step of this many rows costs: the speculator's k (speculation_budget.py)
            self.speculator.observe_step(decode_rows, time.perf_counter() - started)
        return outputs

    # ---- speculative decoding (speculative.py, draft_model.py) ----------------------------------

    def _verify(self, seq: Sequence, token_ids: list[int], row: int, result, now: float) -> RequestOutput:
        """Accept the drafts the target sampled too, append them and the target's next token, and
        give back the KV blocks of the rejected ones; one output for all the tokens."""
        drafts = seq.spec_token_ids
        tokens = accept(drafts, token_ids[row:row + len(drafts) + 1])
        self.speculator.verified(seq, len(seq), len(drafts), len(tokens) - 1)
        seq.num_computed_tokens += len(tokens) - 1  # the accepted drafts' KV is the real tokens'
        outs = []
        for i, token in enumerate(tokens):
            outs.append(self._append_token(seq, token, row + i, result, now))
            if outs[-1].finished:  # a stop inside the accepted run: nothing after it is kept
                return _merged(outs)
        self.kv.trim(seq)
        return _merged(outs)

    def _prompt_scoring(self, batch) -> PromptScoring | None:
        """The step's rows whose logits score a prompt token: position p predicts token p + 1, for
        the positions this step computes whose score is not yet known (a recompute after
        preemption scores nothing twice)."""
        scoring, offset = PromptScoring(), 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.scoring_prompt:
                start = seq.num_computed_tokens
                lo, hi = max(start, len(seq.prompt_logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)
                if lo < hi:
                    scoring.rows += range(offset + lo - start, offset + hi - start)
                    scoring.targets += seq.token_ids[lo + 1:hi + 1]
                    scoring.top_k = max(scoring.top_k, seq.params.prompt_logprobs)
                    scoring.owners.append((seq, hi - lo))
            offset += n
        return scoring if scoring.rows else None

    @staticmethod
    def _store_prompt_scores(scoring: PromptScoring, scores: PromptScores) -> None:
        row = 0
        for seq, count in scoring.owners:
            k = seq.params.prompt_logprobs
            for i in range(row, row + count):
                entry = {scoring.targets[i]: scores.logprobs[i]}
                if k:
                    for t, lp in zip(scores.top_ids[i][:k], scores.top_logprobs[i][:k]):
                        entry.setdefault(t, lp)
                seq.prompt_logprobs.append(entry)
            row += count

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        if any(s.spec_token_ids for s in seqs):
            return self._speculative_sampling_batch(seqs)
        reqs = [self.requests[s.request_id] for s in seqs]
        batch = SamplingBatch.build([s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                                    [s.output_token_ids for s in seqs], [r.generator for r in reqs],
                                    self.model_config.vocab_size, self.device)
        if self._num_constrained:
            rows = [(i, r.grammar) for i, r in enumerate(reqs) if r.grammar is not None]
            if rows:
                batch.token_bitmask = self._structured.fill_bitmask(rows, len(reqs))
                batch.bitmask_rows = [i for i, _ in rows]
        return batch

    def _speculative_sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """One row per position to sample: a sequence with k drafts has k + 1, each seeing the drafts
        before it as its output so far (for penalties). No constrained request speculates."""
        params, prompts, outputs, generators = [], [], [], []
        for s in seqs:
            generator = self.requests[s.request_id].generator
            for i in range(len(s.spec_token_ids) + 1):
                params.append(s.params)
                prompts.append(s.prompt_token_ids)
                outputs.append(s.output_token_ids + s.spec_token_ids[:i])
                generators.append(generator)
        return SamplingBatch.build(params, prompts, outputs, generators, self.model_config.vocab_size, self.device)

    def _grammar_matcher(self, params: SamplingParams):
        """A matcher for a constrained request; ValueError (GrammarError) if its grammar does not
        compile. The compile runs here, on the engine's thread, once per distinct spec (cached)."""
        if self._structured is None:
            from kubeinfer.worker.structured_output import StructuredOutput  # xgrammar only when used
            self._structured = StructuredOutput(self.tokenizer, self.model_config.vocab_size, self.config.max_num_seqs)
        return self._structured.matcher(params.structured_output)

    def _append_token(self, seq: Sequence, token: int, row: int, result, now: float) -> RequestOutput:
        req = self.requests[seq.request_id]
        seq.token_ids.append(token)
        self._generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        logprobs = None
        if params.logprobs is not None and result.logprobs is not None:
            entry = {token: float(result.logprobs[row])}
            if params.logprobs and result.top_logprobs is not None:
                ids, vals = result.top_logprobs
                for t, lp in zip(ids[row, :params.logprobs].tolist(), vals[row, :params.logprobs].tolist()):
                    entry.setdefault(t, lp)
            logprobs = [entry]
        reason = stop_reason = None
        # Only a newly sampled token advances the matcher: a preempted request's recompute re-reads
        # its tokens without sampling them again, so no token is accepted twice.
        if req.grammar is not None and not req.grammar.accept_token(token):
            return self._finish(seq, FinishReason.ERROR, new=[token], logprobs=logprobs,
                                error=f"structured output: the grammar rejected token {token}")
        if req.grammar is not None and req.grammar.is_terminated():  # it accepted a stop token
            reason, stop_reason = FinishReason.STOP, None
            delta = ""
        elif token in self._eos and not params.ignore_eos:
            reason, stop_reason = FinishReason.STOP, None
            delta = ""
        elif token in params.stop_token_ids:
            reason, stop_reason = FinishReason.STOP, token
            delta = ""
        else:
            delta = req.detokenizer.add(token)
            if req.detokenizer.stopped:
                reason, stop_reason = FinishReason.STOP, req.detokenizer.stop_reason
        if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None:
            return self._output(seq, [token], delta, logprobs)
        return self._finish(seq, reason, stop_reason=stop_reason, new=[token], delta=delta, logprobs=logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason, *, stop_reason=None, new: list[int] = (),
                delta: str = "", logprobs=None, error: str | None = None) -> RequestOutput:
        req = self.requests.pop(seq.request_id)
        self._num_constrained -= req.grammar is not None
        self._num_scoring -= seq.prompt_logprobs is not None
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        if reason is not FinishReason.ERROR:
            delta += req.detokenizer.finish()
        out = self._output(seq, list(new), delta, logprobs, req)
        out.finished, out.finish_reason, out.stop_reason, out.error = True, reason.value, stop_reason, error
        out.timings = _timings(seq, time.monotonic())
        return out

    def _output(self, seq: Sequence, new: list[int], delta: str, logprobs, req: _Request | None = None) -> RequestOutput:
        req = req or self.requests[seq.request_id]
        # The prompt's logprobs ride on the output that carries the first token (all are known then).
        prompt_logprobs = seq.prompt_logprobs if seq.prompt_logprobs is not None and new and \
            seq.num_output_tokens == len(new) else None
        return RequestOutput(seq.request_id, new, delta, req.detokenizer.text, seq.output_token_ids,
                             num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
                             logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    # ---- conveniences ---------------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; the final outputs, in prompt order
        (with the prompt logprobs of the requests that asked)."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params_list):
            if isinstance(prompt, str):
                ids.append(self.add_request(prompt=prompt, params=p))
            else:
                ids.append(self.add_request(prompt_token_ids=list(prompt), params=p))
        final: dict[str, RequestOutput] = {}
        prompt_logprobs: dict[str, list] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.finished:
                    final[out.request_id] = out
        for request_id, entries in prompt_logprobs.items():  # the final output holds the whole request
            final[request_id].prompt_logprobs = entries
        return [final[i] for i in ids]

    def stats(self) -> EngineStats:
        return EngineStats(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            computed_tokens=self._computed_tokens,
            num_steps=self._num_steps,
            iteration_tokens=IterationTokens(list(self._iteration_tokens.counts), self._iteration_tokens.total),
            speculative=self.speculator.snapshot() if self.speculator is not None else SpeculativeStats(),
        )


def _merged(outs: list[RequestOutput]) -> RequestOutput:
    """The outputs of one request's tokens in one step, as one output."""
    if len(outs) == 1:
        return outs[0]
    last = outs[-1]
    last.new_token_ids = [t for o in outs for t in o.new_token_ids]
    last.delta_text = "".join(o.delta_text for o in outs)
    if any(o.logprobs for o in outs):
        last.logprobs = [entry for o in outs for entry in (o.logprobs or [])]
    return last

