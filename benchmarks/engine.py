"""Engine benchmark on the default model: kubeinfer against Hugging Face transformers, in one run.

    python benchmarks/engine.py            # the full run (`make bench`)
    python benchmarks/engine.py --compile  # adds rows with torch.compile'd decode steps (torch path)
    python benchmarks/engine.py --quick    # fewer requests and tokens, for a smoke check
    KUBEINFER_CPU_ISA=avx2 python benchmarks/engine.py  # the C++ kernels' lower ISA tier, forced

Prints the CPU model, the ISA tier the C++ kernels run and the machine's measured read bandwidth,
then batch-1 decode tokens/s (fp32, int8, int4 from the bundled Q4_1 GGUF, int4 quantized at load
from an fp32 folder), offline throughput (continuous batching vs static batches of 16), TTFT /
inter-token latency percentiles, achieved bandwidth, KV-cache waste and perplexity per scheme.

Peers, in the same run: Hugging Face transformers runs the same GGUF dequantized to fp32 (the only
way it can run it), with the same torch thread count; llama.cpp (llama-cpp-python, installed by
`make bench-deps`) runs the same Q4_1 GGUF with the same thread count in the decode section. Without
llama-cpp-python the llama.cpp rows are skipped, and the run says so and how to install it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.models.gguf import default_model_path

PROMPT = "The history of the Roman Empire begins with"
LLAMA_CPP_AVX2_SITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "llama-cpp",
                                   "site-avx2")
# What holds torch's own kernels (transformers', and our GEMMs) to a lower ISA, as on an AVX2 node.
TORCH_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
LLAMA_CPP_INSTALL = "make bench-deps  (builds llama-cpp-python from source once, ~10 min on 2 cores; the wheel is cached)"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def weight_bytes(engine: Engine) -> int:
    """Bytes a decode step reads from weights: what each module's kernel actually reads, once.

    With a quantized or packed head the embedding is only used for one-row lookups, so it is not counted.
    """
    from kubeinfer.worker.kernels.packed_linear import PackedLinear
    from kubeinfer.worker.kernels.quant_linear import AtenInt4Linear, AtenInt8Linear, CppInt4Linear
    from kubeinfer.worker.quant import Int4Linear, Int8Linear
    model = engine.runner.model
    total = 0
    for _, mod in model.named_modules():
        if isinstance(mod, AtenInt4Linear):
            read = [mod.packed, mod.scales_and_zeros, mod.bias]
        elif isinstance(mod, CppInt4Linear):
            read = [mod.qs, mod.kernel_scales, mod.kernel_mins, mod.bias]
        elif isinstance(mod, AtenInt8Linear):
            read = [mod.qweight, mod.scales_bf16, mod.bias]
        elif isinstance(mod, PackedLinear):
            total += mod.weight_nbytes
            read = [mod.bias]
        elif mod is model.embed_tokens and (model.quantized_head is not None or model.lm_head is not None):
            read = []  # a step reads one row of it; the head (counted on its own) reads it all
        elif isinstance(mod, (Int4Linear, Int8Linear)):
            read = list(mod.buffers(recurse=False))
        else:
            read = list(mod.parameters(recurse=False))
        total += sum(t.numel() * t.element_size() for t in read if t is not None)
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


# What a chat client sends (the openai SDK leaves temperature to the server, whose default is 1).
CHAT_SAMPLING = dict(temperature=0.8, top_p=0.9)


def ours_decode(engine: Engine, ids: list[int], n: int, sampling: dict | None = None) -> tuple[float, float]:
    """Batch-1 decode tokens/s (first token excluded) and mean decode step time; greedy unless
    ``sampling`` gives SamplingParams fields."""
    params = {"temperature": 0.0, "ignore_eos": True, "seed": 0, **(sampling or {})}
    engine.generate([ids], SamplingParams(max_tokens=4, **params))  # warm-up
    engine.add_request("b1", prompt_token_ids=ids, params=SamplingParams(max_tokens=n, **params))
    engine.step()  # prefill + first token
    t0 = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    dt = time.perf_counter() - t0
    return steps / dt, dt / steps


def read_bandwidth(mib: int = 512, reps: int = 10) -> float:
    """The machine's read bandwidth as torch sees it, GB/s: the best of ``reps`` sums over ``mib`` MiB
    of fp32 (far larger than the L3), with torch's thread count."""
    x = torch.ones(mib << 18)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def load_llama_cpp(path: str, threads: int):
    """llama.cpp on the GGUF ``path`` with ``threads`` threads, or None (said, with how to install it).

    With our avx2 tier forced on a CPU that has more, the fair peer is llama.cpp built for AVX2 too:
    the one `make bench-deps-avx2` puts in .cache/llama-cpp/site-avx2 is loaded instead of the venv's
    (built for this CPU); without it the run says that its peer has the wider instructions."""
    from kubeinfer.worker.kernels.cpu import cpu_tiers, selected_tier
    if selected_tier() == "avx2" and cpu_tiers()[-1] != "avx2":
        if os.path.isdir(os.path.join(LLAMA_CPP_AVX2_SITE, "llama_cpp")):
            sys.path.insert(0, LLAMA_CPP_AVX2_SITE)
        else:
            print("llama.cpp peer: NOTE our avx2 tier is forced but no AVX2-only llama.cpp build is in "
                  f"{LLAMA_CPP_AVX2_SITE} (make bench-deps-avx2): the peer below is the build for this CPU")
    try:
        import llama_cpp
    except ImportError:
        print(f"llama.cpp peer: SKIPPED, llama-cpp-python is not installed here. Install it with: {LLAMA_CPP_INSTALL}")
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    print(f"llama.cpp peer: llama-cpp-python {llama_cpp.__version__} from {os.path.dirname(llama_cpp.__file__)} on {os.path.basename(path)}, "
          f"{threads} threads; its build: {' '.join(info.split())}")
    if selected_tier() == "avx2" and "AVX512 = 1" in info:
        print("llama.cpp peer: NOTE our avx2 tier is forced but this llama.cpp build uses AVX-512: "
              "rebuild it with `rm -rf .cache/llama-cpp && make bench-deps-avx2`")
    return llm


def llama_cpp_decode_tps(llm, ids: list[int], n: int) -> float:
    """Batch-1 greedy decode tokens/s, first token excluded (as ``ours_decode``). ``generate`` never
    stops at EOS, so every run decodes exactly ``n`` tokens."""
    def run(count: int) -> float:
        gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
        next(gen)  # prefill + first token
        t0 = time.perf_counter()
        for i, _ in enumerate(gen, start=1):
            if i == count - 1:
                break
        dt = time.perf_counter() - t0
        gen.close()
        return (count - 1) / dt
    llm.reset()
    run(4)  # warm-up
    llm.reset()
    return run(n)


def fp32_folder(path: str) -> str | None:
    """A Hugging Face fp32 folder of the default model (written once from the GGUF by transformers,
    cached under ~/.cache/kubeinfer/bench/), for the int4 row that quantizes at load; None when it
    cannot be made here (said)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "kubeinfer", "bench", os.path.basename(path).removesuffix(".gguf") + "-fp32")
    if os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(os.path.join(folder, "tokenizer.json")):
        return folder
    try:  # transformers refuses save_pretrained on a GGUF-loaded model: its parts are written one by one
        from safetensors.torch import save_file
        from transformers import AutoTokenizer
        hf = load_hf(path)
        os.makedirs(folder, exist_ok=True)
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        tensors = {name: t.detach().contiguous().clone() for name, t in hf.state_dict().items()
                   if not (name == "lm_head.weight" and hf.config.tie_word_embeddings)}
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(folder)
        del hf, tensors
    except Exception as e:  # no transformers, a read-only cache: the row is skipped, and said
        print(f"int4 quantized at load: SKIPPED, could not write an fp32 folder at {folder} ({type(e).__name__}: {e})")
        return None
    return folder


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


def decode_row(name: str, engine: Engine, tps: float, step_s: float, prompt_len: int, n: int, hf_tps: float,
               lc_tps: float, base_tps: float | None, bandwidth: float) -> None:
    w = weight_bytes(engine)
    ctx = prompt_len + n // 2
    kv_per_token = engine.kv_cache_bytes / (engine.num_kv_blocks * engine.kv.block_size)
    gbps = (w + ctx * kv_per_token) / step_s / 1e9
    vs_base = f"{tps / base_tps:5.2f}x" if base_tps else "  1.00x"
    vs_lc = f"{tps / lc_tps:5.2f}x" if lc_tps == lc_tps and lc_tps > 0 else "  n/a"
    vs_hf = f"{tps / hf_tps:5.2f}x" if hf_tps == hf_tps and hf_tps > 0 else "  n/a"  # nan: --no-transformers
    print(f"kubeinfer {name:<12} {tps:7.1f} tok/s  step {step_s * 1e3:5.1f} ms  weights {w / 1e6:6.1f} MB  "
          f"{gbps:5.1f} GB/s ({gbps / bandwidth * 100:3.0f}% of read bw)  vs transformers {vs_hf}  "
          f"vs fp32 {vs_base}  vs llama.cpp {vs_lc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens: a smoke run")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="the throughput section's token budget per step (an offline setting: vLLM's offline LLM "
                         "also budgets more than its server; the engine's serving default is 512)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved batch-1 decode rounds (best one counts)")
    ap.add_argument("--compile", action="store_true",
                    help="also run the decode and throughput rows with torch.compile'd decode steps")
    ap.add_argument("--no-transformers", action="store_true",
                    help="skip the transformers rows (decode and ppl sections only): kubeinfer against itself, "
                         "e.g. one ISA tier against another")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer in the decode section")
    ap.add_argument("--no-int4-at-load", action="store_true",
                    help="skip the decode row of int4 quantized at load from an fp32 folder")
    ap.add_argument("--sections", default="decode,throughput,ppl",
                    help="comma-separated subset of decode, throughput, ppl")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    compile_modes = (False, True) if args.compile else (False,)
    max_prompt, max_out = (128, 32) if args.quick else (512, 256)
    n_req = 16 if args.quick else args.requests
    ppl_tokens = 512 if args.quick else args.ppl_tokens

    from kubeinfer.worker.kernels.cpu import ENV_VAR, cpu_tiers, selected_tier
    bandwidth = read_bandwidth()
    print(f"machine: {platform.machine()} {cpu_model()} cpus={os.cpu_count()} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}; read bandwidth {bandwidth:.1f} GB/s (torch sum over 512 MiB, "
          f"{torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.2f}")
    print(f"C++ kernels' ISA tier: {selected_tier()} (this CPU runs {', '.join(cpu_tiers()) or 'none'}; "
          f"{ENV_VAR}={os.environ.get(ENV_VAR, 'unset')}); torch's kernels: {torch.backends.cpu.get_cpu_capability()}"
          + "".join(f", {v}={os.environ[v]}" for v in TORCH_ISA_VARS if v in os.environ))
    path = default_model_path()
    print(f"model: {os.path.basename(path)} (SmolLM2-135M-Instruct; transformers runs it dequantized to fp32)")
    if args.no_transformers and "throughput" in sections:
        ap.error("--no-transformers leaves the throughput section without its baseline: pick decode,ppl")
    hf = None if args.no_transformers else load_hf(path)

    if "decode" in sections:
        folder = None if args.no_int4_at_load else fp32_folder(path)
        llm = None if args.no_llama_cpp else load_llama_cpp(path, torch.get_num_threads())
        bench_decode(hf, llm, folder, args.decode_tokens, compile_modes, args.rounds, bandwidth)
        del llm
    if "throughput" in sections:
        bench_throughput(hf, n_req, args.seed, max_prompt, max_out, compile_modes, args.max_num_batched_tokens)
    del hf
    if "ppl" in sections:
        bench_ppl(ppl_tokens)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def native_bf16() -> bool:
    """bf16 runs natively here (dtype auto's test): our kernels' tier and torch's oneDNN, which
    ONEDNN_MAX_CPU_ISA holds to AVX2 when `make bench-cpu-tiers` measures an AVX2 node."""
    from kubeinfer.worker.auto_dtype import cpu_runs_bf16_natively
    return cpu_runs_bf16_natively()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def bench_decode(hf, llm, fp32_dir: str | None, decode_tokens: int, compile_modes: tuple[bool, ...], rounds: int,
                 bandwidth: float) -> None:
    """Interleaved rounds: each round times transformers, llama.cpp and then every kubeinfer engine
    once, and a figure is an engine's best round. On this 2-core VM a disturbance (any other busy
    process) slows torch for seconds to minutes; interleaving spreads it over all engines instead of one.

    Rows: fp32 and bf16 (the GGUF dequantized; dtype auto picks bf16 on a CPU with native bf16), int8 (quantized at load), int4 (the GGUF's Q4_1 blocks loaded as
    they are) and int4-load (an fp32 folder quantized to int4 at load, what a user with a Hugging Face
    checkpoint runs)."""
    from kubeinfer.worker.kernels.cpu import cpu_tiers, selected_tier
    engine = Engine(max_model_len=2048, num_kv_blocks=256)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    del engine
    print(f"\n== batch-1 decode (greedy, {decode_tokens} tokens after a {len(prompt_ids)}-token prompt; "
          f"best of {rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f})")
    for compiled in compile_modes:
        tag = "+compile" if compiled else ""
        configs = {"fp32": dict(dtype="float32"), **({"bf16": dict(dtype="bfloat16")} if native_bf16() else {}), "int8": dict(quantization="int8"), "int4": dict(quantization="int4")}
        if fp32_dir is not None:
            configs["int4-load"] = dict(model=fp32_dir, quantization="int4")  # auto: float32
        engines = {scheme: Engine(max_model_len=2048, num_kv_blocks=256, compile=compiled, **kw)
                   for scheme, kw in configs.items()}
        hf_tps = float("nan") if hf is None else 0.0
        lc_tps = float("nan") if llm is None else 0.0
        best = {scheme: (0.0, 0.0) for scheme in engines}
        per_round: list[dict[str, float]] = []
        for r in range(rounds):
            measured = {}
            line = []
            if hf is not None:
                measured["transformers"] = hf_decode_tps(hf, prompt_ids, decode_tokens)
                hf_tps = max(hf_tps, measured["transformers"])
                line.append(f"transformers {measured['transformers']:.1f}")
            if llm is not None:
                measured["llama.cpp"] = llama_cpp_decode_tps(llm, prompt_ids, decode_tokens)
                lc_tps = max(lc_tps, measured["llama.cpp"])
                line.append(f"llama.cpp {measured['llama.cpp']:.1f}")
            for scheme, engine in engines.items():
                result = ours_decode(engine, prompt_ids, decode_tokens)
                best[scheme] = max(best[scheme], result)
                measured[scheme] = result[0]
                line.append(f"{scheme}{tag} {result[0]:.1f}")
            result = ours_decode(engines["int4"], prompt_ids, decode_tokens, CHAT_SAMPLING)
            best["int4-sampled"] = max(best.get("int4-sampled", (0.0, 0.0)), result)
            measured["int4-sampled"] = result[0]
            line.append(f"int4-sampled{tag} {result[0]:.1f}")
            per_round.append(measured)
            print(f"round {r + 1} tok/s: " + ", ".join(line) + f"  (load {os.getloadavg()[0]:.2f})")
        print(f"transformers fp32 {hf_tps:7.1f} tok/s" if hf is not None else "transformers fp32 skipped (--no-transformers)")
        print(f"llama.cpp Q4_1    {lc_tps:7.1f} tok/s" if llm is not None else
              f"llama.cpp Q4_1    skipped (install: {LLAMA_CPP_INSTALL})")
        for scheme, engine in [*engines.items(), ("int4-sampled", engines["int4"])]:
            decode_row(scheme + tag, engine, *best[scheme], len(prompt_ids), decode_tokens, hf_tps, lc_tps,
                       best["fp32"][0] if scheme != "fp32" else None, bandwidth)
        print(f"  int4-sampled: the int4 engine sampling as a chat client asks ({CHAT_SAMPLING}), seed 0")
        del engines
        rows = {scheme: tps for scheme, (tps, _) in best.items()}
        best_tier = selected_tier() == (cpu_tiers() or [None])[-1]
        lc_target = 1.2 if best_tier else 1.0

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b == b and b > 0 else "n/a"
        print(f"targets{tag} (issue 13, {'best' if best_tier else 'forced lower'} tier {selected_tier()}): "
              f"fp32 >= 2.5x transformers: {ratio(rows['fp32'], hf_tps)}; "
              f"int8 >= 1.7x fp32: {ratio(rows['int8'], rows['fp32'])}; "
              f"int4 >= 2.5x fp32: {ratio(rows['int4'], rows['fp32'])}; "
              f"int4 >= {lc_target}x llama.cpp: {ratio(rows['int4'], lc_tps)}  (best rounds)")

        def median_ratio(a: str, b: str) -> str:  # paired within a round: both saw the same VM state
            if not all(a in m and b in m for m in per_round):
                return "n/a"
            return f"{statistics.median(m[a] / m[b] for m in per_round):.2f}x"
        print(f"  median of per-round ratios: fp32 / transformers {median_ratio('fp32', 'transformers')}; "
              f"int8 / fp32 {median_ratio('int8', 'fp32')}; int4 / fp32 {median_ratio('int4', 'fp32')}; "
              f"int4 / llama.cpp {median_ratio('int4', 'llama.cpp')}; int4-sampled / int4 "
              f"{median_ratio('int4-sampled', 'int4')}"
              + (f"; int4-load / llama.cpp {median_ratio('int4-load', 'llama.cpp')}" if "int4-load" in rows else ""))


def bench_throughput(hf, n_req: int, seed: int, max_prompt: int, max_out: int,
                     compile_modes: tuple[bool, ...], budget: int) -> None:
    """Each kubeinfer float dtype against transformers in the same dtype: bf16 speeds both up, so only
    a same-dtype ratio measures batching and kernels rather than precision. The int8 and int4 rows
    (fp32 activations on the C++ kernels; int4 is the GGUF's Q4_1 as stored) have no transformers
    twin: they are set against transformers' fastest dtype."""
    reqs = make_workload(n_req, hf.config.vocab_size, seed, max_prompt, max_out)
    print(f"\n== offline throughput: {n_req} requests, prompts 16-{max_prompt}, outputs 16-{max_out} "
          f"(seed {seed}), {sum(o for _, o in reqs)} output tokens; kubeinfer max_num_seqs 64, "
          f"max_num_batched_tokens {budget}")
    theirs = {}
    dtypes = ("float32", "bfloat16") if native_bf16() else ("float32",)
    if len(dtypes) == 1:
        print("bf16 rows skipped: this tier has no native bf16 dot products (GEMMs widen bf16 in software, "
              "~10x slower than fp32's), so neither side would serve in bf16 here")
    for dtype in dtypes:
        theirs[dtype] = hf_throughput(hf.to(getattr(torch, dtype)), reqs)
        print(f"transformers {dtype:<9} {theirs[dtype]['tps']:7.1f} output tok/s  wall {theirs[dtype]['wall']:.1f} s  "
              "static batches of 16, left-padded, each run to its longest output")
    hf.to(torch.float32)
    their_best = max(theirs, key=lambda d: theirs[d]["tps"])
    ratios = {}
    tps = {}
    waste = []
    configs = [(d, None) for d in dtypes] + [("float32", q) for q in ("int8", "int4")]
    for (dtype, quant), compiled in [(cfg, c) for c in compile_modes for cfg in configs]:
        engine = Engine(max_model_len=2048, dtype=dtype, quantization=quant, kv_cache_memory_bytes=3 << 30,
                        max_num_seqs=64, max_num_batched_tokens=budget, compile=compiled)
        name = (quant or dtype) + ("+compile" if compiled else "")
        ours = ours_throughput(engine, reqs)
        del engine
        tps[name] = ours["tps"]
        base = dtype if quant is None else their_best
        if quant is None:
            ratios[name] = ours["tps"] / theirs[dtype]["tps"]
        waste.append(ours["waste"])
        print(f"kubeinfer {name:<9} {ours['tps']:7.1f} output tok/s  wall {ours['wall']:.1f} s  "
              f"({ours['total_tps']:.1f} tok/s incl. prompts)  vs transformers {base} "
              f"{ours['tps'] / theirs[base]['tps']:.2f}x  "
              + (f"(vs transformers float32 {ours['tps'] / theirs['float32']['tps']:.2f}x)  " if base != "float32" else "")
              + f"preemptions {ours['preemptions']}")
        print(f"    TTFT p50 {ours['ttft_p50'] * 1e3:.0f} ms p99 {ours['ttft_p99'] * 1e3:.0f} ms (all arrive at t=0)  "
              f"ITL p50 {ours['itl_p50'] * 1e3:.1f} ms p99 {ours['itl_p99'] * 1e3:.1f} ms  "
              f"KV waste at peak ({ours['peak_blocks']} blocks) {ours['waste'] * 100:.2f}%")
    fastest = max(tps, key=tps.get)
    print(f"fastest: kubeinfer {fastest} {tps[fastest]:.1f} tok/s against transformers' fastest ({their_best}) "
          f"{theirs[their_best]['tps']:.1f}: {tps[fastest] / theirs[their_best]['tps']:.2f}x")
    best = max(ratios, key=ratios.get)
    print(f"targets: continuous batching / static, same dtype >= 5x: {ratios[best]:.2f}x ({best}); "
          f"issue 13, fastest / transformers' fastest >= 5x: {tps[fastest] / theirs[their_best]['tps']:.2f}x "
          f"({fastest}); KV waste <= 4%: {max(waste) * 100:.2f}%")


def bench_ppl(ppl_tokens: int) -> None:
    """Perplexity twice: in 32-token chunks (the prefill kernels: int8 runs its bf16 GEMM there) and one
    token a step (the decode kernels, e.g. the VNNI int8_gemv that rounds activations to int8)."""
    from kubeinfer.worker.evaluation import builtin_corpus, perplexity
    decode_tokens = ppl_tokens // 2  # one step per token: half the text keeps the section short
    print(f"\n== perplexity on the built-in corpus (Python docstrings, windows of 512): first {ppl_tokens} tokens "
          f"in 32-token chunks (prefill path), first {decode_tokens} one token a step (decode path)")
    ppl: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    for name, kw in (("fp32", dict(dtype="float32")), ("int8", dict(quantization="int8")), ("int4", dict(quantization="int4")),
                     ("int8-KV", dict(kv_cache_dtype="int8"))):
        engine = Engine(max_model_len=512, num_kv_blocks=64, **kw)
        ids = engine.tokenizer.encode(builtin_corpus())
        ppl["prefill"][name], _ = perplexity(engine, ids[:ppl_tokens])
        ppl["decode"][name], _ = perplexity(engine, ids[:decode_tokens], chunk=1)
        del engine
        cells = []
        for path in ("prefill", "decode"):
            v = ppl[path][name]
            delta = "" if name == "fp32" else f" ({(v / ppl[path]['fp32'] - 1) * 100:+.2f}%)"
            cells.append(f"{path} {v:8.4f}{delta:<10}")
        print(f"{name:<8} " + "   ".join(cells))
    print("targets: int8 within +1%, int4 within +8%, int8-KV within +1% of fp32 (on both paths)")


if __name__ == "__main__":
    main()
