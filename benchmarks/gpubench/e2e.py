"""Whole-engine sections: (a) batch-1 decode, (b) 64-request offline throughput, (e) a ~1B model.

kubeinfer and transformers run the same model folder on the same device in the same dtype, greedy,
with a fixed number of new tokens (EOS ignored). transformers runs its plain ``generate`` (its default
SDPA attention and dynamic cache, no torch.compile): "eager" below means exactly that.
"""

from __future__ import annotations

import os
import random
import time

import torch

from gpubench.common import Ctx
from gpubench.models import (LLAMA32_1B, TINY_LARGE, backend_name, kv_bytes_per_token, random_model, smollm2,
                             weight_bytes)

PROMPT_LEN = 32
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def make_engine(ctx: Ctx, path: str, kv_bytes: int, **kw):
    """An engine on the benchmark device with an explicit KV pool (several engines share the GPU, so
    none may size its pool from gpu_memory_utilization here)."""
    from kubeinfer.worker import Engine, EngineConfig
    cfg = dict(model=path, device=ctx.device, dtype=_DTYPE_NAMES[ctx.dtype], kv_cache_memory_bytes=kv_bytes)
    if ctx.smoke:
        cfg["kernel_backend"] = "torch"  # the CPU's C++ kernels would be built first (~40 s): not what smoke checks
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


def ours_decode(engine, ids: list[int], n: int) -> tuple[float, float]:
    """Batch-1 decode tokens/s (the prefill step and its token excluded) and the mean step time."""
    from kubeinfer.worker import SamplingParams
    engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up, graphs
    engine.add_request("b1", prompt_token_ids=ids,
                       params=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    engine.step()  # prefill + first token
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()  # returns after the sampled ids reach the host: no extra sync needed
        steps += 1
    dt = time.perf_counter() - t0
    return steps / dt, dt / steps


def hf_generate(ctx: Ctx, hf, ids: torch.Tensor, mask: torch.Tensor, n: int) -> float:
    """Seconds for transformers' greedy ``generate`` of exactly ``n`` new tokens."""
    ctx.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    ctx.sync()
    assert out.shape[1] == ids.shape[1] + n, "transformers stopped early"
    return time.perf_counter() - t0


def hf_decode_tps(ctx: Ctx, hf, ids: list[int], n: int) -> float:
    """Batch-1 decode tokens/s of transformers: (n-token generate - 1-token generate) / (n - 1)."""
    x = torch.tensor([ids], device=ctx.device)
    mask = torch.ones_like(x)
    hf_generate(ctx, hf, x, mask, 2)  # warm-up
    t1 = hf_generate(ctx, hf, x, mask, 1)
    tn = hf_generate(ctx, hf, x, mask, n)
    return (n - 1) / max(tn - t1, 1e-9)


def decode_bytes(engine, step_s: float, context: int) -> dict:
    """What one batch-1 decode step reads (weights + the KV of ``context`` tokens), for section (d)."""
    w = weight_bytes(engine)
    kv = kv_bytes_per_token(engine) * context
    return dict(step_s=step_s, weight_bytes=w, kv_bytes=kv, bytes_per_s=(w + kv) / step_s)


def section_decode(ctx: Ctx) -> None:
    """(a) batch-1 decode, kubeinfer bf16 and int4 vs transformers eager bf16, best of interleaved rounds."""
    n = 8 if ctx.smoke else 128
    rounds = 1 if ctx.smoke else 3
    model = smollm2(os.path.join(ctx.tmp, "smollm2"), ctx.dtype, ctx.device, ctx.smoke)
    ctx.results["model"] = model
    print(f"model: {model.description}")
    ids = prompt_ids(model.vocab_size, PROMPT_LEN, 0)
    kv = (64 << 20) if ctx.smoke else (1 << 30)
    engines = {"bf16": make_engine(ctx, model.path, kv, max_model_len=1024),
               "int4": make_engine(ctx, model.path, kv, max_model_len=1024, quantization="int4")}
    for name, engine in engines.items():
        print(f"kubeinfer {name}: kernel backend {backend_name(engine)}, {engine.num_kv_blocks} KV blocks")
    print(f"greedy, {n} new tokens after a {PROMPT_LEN}-token prompt, EOS ignored; best of {rounds} "
          "interleaved rounds (each: transformers, then every kubeinfer engine)")
    hf_best, best = 0.0, {name: (0.0, 0.0) for name in engines}
    for r in range(rounds):
        ctx.check_time(20)
        hf_tps = hf_decode_tps(ctx, model.hf, ids, n)
        hf_best = max(hf_best, hf_tps)
        line = [f"transformers {hf_tps:.1f}"]
        for name, engine in engines.items():
            tps, step = ours_decode(engine, ids, n)
            best[name] = max(best[name], (tps, step))
            line.append(f"kubeinfer {name} {tps:.1f}")
        print(f"round {r + 1} tok/s: " + ", ".join(line))
    print(f"transformers eager bf16 {hf_best:8.1f} tok/s")
    ctx.results["decode"] = {}
    for name, engine in engines.items():
        tps, step = best[name]
        ctx.results["decode"][name] = decode_bytes(engine, step, PROMPT_LEN + n // 2)
        ratio = tps / hf_best
        print(f"kubeinfer {name:<4} {tps:8.1f} tok/s  step {step * 1e3:6.2f} ms  "
              f"weights {ctx.results['decode'][name]['weight_bytes'] / 1e6:6.1f} MB  vs transformers {ratio:5.2f}x")
        ctx.row(f"(a) batch-1 decode {name} / transformers eager", ratio, "x", ">= 5x", ratio >= 5)
    ctx.row("(a) transformers eager batch-1 decode", hf_best, "tok/s")


def make_requests(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def ours_offline(engine, reqs: list[list[int]], out_len: int) -> float:
    """Wall seconds for every request (all submitted at t=0) to produce ``out_len`` tokens."""
    from kubeinfer.worker import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    # Warm-up at the full batch (graphs, kernel builds for every shape), with other prompts so that the
    # timed run finds nothing of its own in the prefix cache.
    rng = random.Random(99)
    warm = [[rng.randrange(100, engine.model_config.vocab_size) for _ in range(len(p))] for p in reqs]
    engine.generate(warm, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate(reqs, params)
    wall = time.perf_counter() - t0
    assert all(len(o.output_token_ids) == out_len for o in outs)
    return wall


def hf_static(ctx: Ctx, hf, reqs: list[list[int]], out_len: int) -> float:
    """transformers' static batching: one left-padded batch of every request, run to ``out_len``."""
    width = max(len(p) for p in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(reqs):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    hf_generate(ctx, hf, ids[:2], mask[:2], 2)  # warm-up
    return hf_generate(ctx, hf, ids, mask, out_len)


def section_throughput(ctx: Ctx) -> None:
    """(b) 64 requests x 128-256 prompt tokens x 128 output tokens: continuous vs static batching."""
    model = ctx.results.get("model") or smollm2(os.path.join(ctx.tmp, "smollm2"), ctx.dtype, ctx.device, ctx.smoke)
    n_req, lo, hi, out_len = (4, 8, 16, 8) if ctx.smoke else (64, 128, 256, 128)
    reqs = make_requests(model.vocab_size, n_req, lo, hi, seed=1)
    print(f"{n_req} requests, prompts {lo}-{hi} tokens ({sum(map(len, reqs))} in all), {out_len} output tokens "
          f"each, all submitted at t=0, greedy, EOS ignored")
    engine = make_engine(ctx, model.path, (64 << 20) if ctx.smoke else (4 << 30), max_model_len=hi + out_len + 16,
                         max_num_seqs=n_req, max_num_batched_tokens=256 if ctx.smoke else 8192)
    ctx.check_time(30)
    ours = ours_offline(engine, reqs, out_len)
    stats = engine.stats()
    del engine
    ctx.free()
    ctx.check_time(30)
    theirs = hf_static(ctx, model.hf, reqs, out_len)
    tokens = n_req * out_len
    ratio = theirs / ours
    print(f"kubeinfer bf16 (continuous batching)      {tokens / ours:9.1f} output tok/s  wall {ours:6.2f} s  "
          f"preemptions {stats.num_preemptions}")
    print(f"transformers bf16 (one static batch of {n_req}) {tokens / theirs:9.1f} output tok/s  wall {theirs:6.2f} s")
    ctx.row(f"(b) {n_req}-request throughput / transformers static", ratio, "x", ">= 10x", ratio >= 10)
    ctx.row("(b) kubeinfer offline output throughput", tokens / ours, "tok/s")


def section_large(ctx: Ctx) -> None:
    """(e) Llama-3.2-1B shapes, random weights: batch-1 and batch-64 decode, vs transformers."""
    ctx.check_time(15 if ctx.smoke else 90)
    spec = TINY_LARGE if ctx.smoke else LLAMA32_1B
    t0 = time.perf_counter()
    model = random_model(os.path.join(ctx.tmp, "llama1b"), spec, ctx.dtype, ctx.device, seed=2)
    print(f"model: Llama-3.2-1B shapes, {model.description} (built and saved in {time.perf_counter() - t0:.0f} s)")
    engine = make_engine(ctx, model.path, (64 << 20) if ctx.smoke else (4 << 30), max_model_len=1024,
                         max_num_seqs=64, max_num_batched_tokens=256 if ctx.smoke else 8192)
    print(f"kubeinfer kernel backend {backend_name(engine)}")
    n = 8 if ctx.smoke else 128
    ids = prompt_ids(model.vocab_size, PROMPT_LEN, 3)
    tps, step = ours_decode(engine, ids, n)
    moved = decode_bytes(engine, step, PROMPT_LEN + n // 2)
    copy_bps = ctx.results.get("copy_bytes_per_s")
    if copy_bps:
        frac = moved["bytes_per_s"] / copy_bps
        print(f"batch-1 step reads {(moved['weight_bytes'] + moved['kv_bytes']) / 1e9:.2f} GB: "
              f"{moved['bytes_per_s'] / 1e9:.0f} GB/s, {frac:.0%} of the copy bandwidth")
        ctx.row("(e) 1B batch-1 decode bandwidth / device copy", frac * 100, "%")
    ctx.check_time(20)
    hf_tps = hf_decode_tps(ctx, model.hf, ids, 8 if ctx.smoke else 64)
    print(f"batch 1:  kubeinfer {tps:8.1f} tok/s (step {step * 1e3:.2f} ms)  transformers eager {hf_tps:8.1f} tok/s  "
          f"ratio {tps / hf_tps:5.2f}x")
    ctx.row("(e) 1B batch-1 decode / transformers eager", tps / hf_tps, "x")
    n_req, out_len = (4, 8) if ctx.smoke else (64, 128)
    reqs = make_requests(model.vocab_size, n_req, 8 if ctx.smoke else 128, 8 if ctx.smoke else 128, seed=4)
    ctx.check_time(20)
    ours = ours_offline(engine, reqs, out_len)
    del engine
    ctx.free()
    ctx.check_time(20)
    theirs = hf_static(ctx, model.hf, reqs, out_len)
    tokens = n_req * out_len
    print(f"batch {n_req}: kubeinfer {tokens / ours:8.1f} output tok/s  transformers static {tokens / theirs:8.1f} "
          f"tok/s  ratio {theirs / ours:5.2f}x  ({n_req} prompts of {len(reqs[0])} tokens, {out_len} out)")
    ctx.row(f"(e) 1B batch-{n_req} throughput / transformers static", theirs / ours, "x")
    del model
    ctx.free()
