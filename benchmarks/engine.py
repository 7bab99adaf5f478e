"""Engine benchmark on the default model: kubeinfer against Hugging Face transformers, in one run.

    python benchmarks/engine.py            # the full run (`make bench`)
    python benchmarks/engine.py --quick    # fewer requests and tokens, for a smoke check

Prints batch-1 decode tokens/s, offline throughput (continuous batching vs static batches of 16),
TTFT / inter-token latency percentiles, achieved bandwidth and KV-cache waste. Both sides run fp32
on the same weights (the bundled GGUF, dequantized), with the same torch thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.models.gguf import default_model_path

PROMPT = "The history of the Roman Empire begins with"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def weight_bytes(engine: Engine) -> int:
    """Bytes a decode step reads from weights: every matrix once (the embedding table only via the head)."""
    model = engine.runner.model
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters())
    return total


def load_hf(path: str):
    from transformers import AutoModelForCausalLM
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


def hf_decode_tps(hf, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t0
    return (n - 1) / (total - t_prefill)


def ours_decode(engine: Engine, ids: list[int], n: int) -> tuple[float, float]:
    """Batch-1 decode tokens/s (first token excluded) and mean decode step time."""
    engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    engine.add_request("b1", prompt_token_ids=ids, params=SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    engine.step()  # prefill + first token
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    return steps / dt, dt / steps


def make_workload(n: int, vocab: int, seed: int, max_prompt: int, max_out: int):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(16, max_prompt)
        olen = rng.randint(16, max_out)
        reqs.append(([rng.randrange(100, vocab) for _ in range(plen)], olen))
    return reqs


def ours_throughput(engine: Engine, reqs) -> dict:
    t0 = time.perf_counter()
    token_times: dict[str, list[float]] = {}
    for i, (ids, olen) in enumerate(reqs):
        engine.add_request(str(i), prompt_token_ids=ids,
                           params=SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True))
        token_times[str(i)] = []
    bs = engine.kv.block_size
    peak_blocks, waste_at_peak = -1, 0.0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            token_times[o.request_id].extend([now] * len(o.new_token_ids))
        running = engine.scheduler.running
        allocated = sum(len(engine.kv.tables.get(s.request_id, ())) for s in running)
        if allocated > peak_blocks:
            used = sum(s.num_computed_tokens for s in running)
            peak_blocks, waste_at_peak = allocated, 1 - used / (allocated * bs) if allocated else 0.0
    wall = time.perf_counter() - t0
    out_tokens = sum(olen for _, olen in reqs)
    ttft = [ts[0] - t0 for ts in token_times.values()]
    itl = [b - a for ts in token_times.values() for a, b in zip(ts, ts[1:])]
    return dict(wall=wall, out_tokens=out_tokens, tps=out_tokens / wall,
                total_tps=(out_tokens + sum(len(p) for p, _ in reqs)) / wall,
                ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
                itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99),
                peak_blocks=peak_blocks, waste=waste_at_peak, preemptions=engine.stats().num_preemptions)


def hf_throughput(hf, reqs, batch: int = 16) -> dict:
    """Static batches in arrival order, left-padded, each run to its longest requested output."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for r, (p, _) in enumerate(group):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            n = max(o for _, o in group)
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=0)
    wall = time.perf_counter() - t0
    out_tokens = sum(o for _, o in reqs)  # only the tokens that were asked for count
    return dict(wall=wall, out_tokens=out_tokens, tps=out_tokens / wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true", help="kubeinfer figures only")
    args = ap.parse_args()
    max_prompt, max_out = (128, 32) if args.quick else (512, 256)
    n_req = 16 if args.quick else args.requests

    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    path = default_model_path()
    engine = Engine(max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=512)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    w_bytes = weight_bytes(engine)
    print(f"model: {path} (fp32, {w_bytes / 1e6:.0f} MB of weights); KV pool {engine.num_kv_blocks} blocks "
          f"({engine.kv_cache_bytes / 2**20:.0f} MiB)")

    tps, step_s = ours_decode(engine, prompt_ids, args.decode_tokens)
    ctx = len(prompt_ids) + args.decode_tokens // 2
    kv_per_token = engine.kv_cache_bytes / (engine.num_kv_blocks * engine.kv.block_size)
    gbps = (w_bytes + ctx * kv_per_token) / step_s / 1e9
    hf = None if args.skip_hf else load_hf(path)
    hf_tps = hf_decode_tps(hf, prompt_ids, args.decode_tokens) if hf is not None else float("nan")
    print("\n== batch-1 decode (greedy, %d tokens)" % args.decode_tokens)
    print(f"kubeinfer     {tps:8.1f} tok/s   step {step_s * 1e3:.1f} ms   achieved {gbps:.1f} GB/s (weights+KV)")
    print(f"transformers  {hf_tps:8.1f} tok/s")
    print(f"ratio         {tps / hf_tps:8.2f}x   (target >= 3x)")

    reqs = make_workload(n_req, engine.model_config.vocab_size, args.seed, max_prompt, max_out)
    ours = ours_throughput(engine, reqs)
    theirs = hf_throughput(hf, reqs) if hf is not None else dict(tps=float("nan"), wall=float("nan"))
    print(f"\n== offline throughput: {n_req} requests, prompts 16-{max_prompt}, outputs 16-{max_out} "
          f"(seed {args.seed}), {ours['out_tokens']} output tokens")
    print(f"kubeinfer     {ours['tps']:8.1f} output tok/s ({ours['total_tps']:.1f} incl. prompt)  wall {ours['wall']:.1f} s"
          f"  continuous batching, max_num_seqs 64, preemptions {ours['preemptions']}")
    print(f"transformers  {theirs['tps']:8.1f} output tok/s  wall {theirs['wall']:.1f} s  static batches of 16, padded")
    print(f"ratio         {ours['tps'] / theirs['tps']:8.2f}x   (target >= 5x)")
    print(f"TTFT p50 {ours['ttft_p50'] * 1e3:.0f} ms  p99 {ours['ttft_p99'] * 1e3:.0f} ms (all requests arrive at t=0)")
    print(f"ITL  p50 {ours['itl_p50'] * 1e3:.1f} ms  p99 {ours['itl_p99'] * 1e3:.1f} ms")
    print(f"KV-cache waste at peak ({ours['peak_blocks']} blocks): {ours['waste'] * 100:.2f}%   (target <= 4%)")


if __name__ == "__main__":
    main()
