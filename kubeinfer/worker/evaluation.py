"""Quality measurement: per-token log-likelihood and perplexity on a corpus every machine has."""

from __future__ import annotations

import importlib
import inspect
import math

import torch

from kubeinfer.worker.engine import Engine
from kubeinfer.worker.sampling_params import SamplingParams
from kubeinfer.worker.scheduler import ScheduledBatch
from kubeinfer.worker.sequence import Sequence

# Modules whose docstrings make the built-in corpus: plain English prose about code, shipped with every
# Python, so perplexity needs no download. Their text varies a little between Python versions, so
# compare figures from one run (or one interpreter) only.
CORPUS_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading",
                  "asyncio.tasks", "functools", "itertools", "dataclasses", "typing", "unittest.case",
                  "http.client", "email.message", "csv", "sqlite3", "textwrap", "heapq", "bisect")


def builtin_corpus() -> str:
    """The docstrings of CORPUS_MODULES and their public members, in a fixed order."""
    parts = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(doc)
    return "\n\n".join(parts)


@torch.inference_mode()
def prompt_logits(engine: Engine, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Float32 logits at every position of ``token_ids`` ([len, vocab]), through the engine's own
    runner, paged cache and chunked prefill (``chunk`` tokens a step, default the engine's token
    budget). The engine must be idle."""
    if engine.has_unfinished_requests():
        raise RuntimeError("prompt_logits needs an idle engine")
    seq = Sequence("__eval__", list(token_ids), SamplingParams())
    chunk = min(chunk or engine.config.max_num_batched_tokens, engine.config.max_num_batched_tokens)
    rows = []
    try:
        while seq.num_computed_tokens < len(seq):
            n = min(chunk, len(seq) - seq.num_computed_tokens)
            if not engine.kv.allocate_slots(seq, n):
                raise RuntimeError("the KV cache is too small for this text")
            batch = ScheduledBatch([seq], [n])
            hidden = engine.runner.forward(engine.runner.prepare(batch, [engine.kv.block_ids(seq.request_id)]))
            rows.append(engine.runner.model.compute_logits(hidden).cpu())
            seq.num_computed_tokens += n
    finally:
        engine.kv.forget(seq)
    return torch.cat(rows)


def perplexity(engine: Engine, token_ids: list[int], window: int = 512, chunk: int = 32) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``window`` tokens.

    Returns (perplexity, tokens scored). Each window is scored on its own (its first token is context,
    not scored). Windows run in chunks of ``chunk`` tokens so that, as in decoding, most keys a query
    sees come back from the paged cache: otherwise an int8 KV cache would go unmeasured.
    """
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = token_ids[start:start + window]
        if len(ids) < 2:
            break
        logp = torch.log_softmax(prompt_logits(engine, ids, chunk)[:-1], dim=-1)
        target = torch.tensor(ids[1:])
        nll -= logp.gather(1, target.unsqueeze(1)).sum().item()
        count += len(ids) - 1
    return math.exp(nll / count), count
