"""The engine on CUDA, end to end (bf16/fp16, Triton kernels, CUDA graphs, the profiled KV pool).

Every test is marked ``cuda``; `make gpu-check` runs them on a GPU machine (``pytest -m cuda
tests/test_cuda.py``), and without CUDA the whole module is skipped at collection. Models are random
weights built from configs (nothing is downloaded) and saved to a tmp folder that kubeinfer and
transformers both load.

Why ties are allowed. In bf16 and fp16 two correct implementations do not compute the same bits:
fused q|k|v and gate|up GEMMs, other attention kernels, and cuBLAS picking its kernel by the number of
rows each round differently. A bf16 logit near 16 is only known to 0.125. Random models have many
close top-two logits (about 1% of positions flip between transformers in bf16 and the same model in
fp32, measured on the models below), so free-running greedy outputs may part at such a position and
then continue differently. As in tests/test_serve_e2e.py (and vLLM's check_logprobs_close), outputs
must match token for token up to the first divergence, and that divergence must be a near-tie.

* Against transformers the tolerance is measured, not chosen: transformers' own error at that dtype
  (its logits against the same rounded weights run in fp32), counted twice (one per side), plus 1e-2
  (serve e2e's near-tie; all there is in fp32, the strict case that catches logic errors). Every token
  kubeinfer picks, free-running, must be the exact-arithmetic greedy pick up to that tolerance, and
  kubeinfer must pick it at least as often as transformers does (less 5 points). Against transformers'
  own free-running ``generate``, the outputs must agree up to a first divergence, where transformers'
  token may not be better than kubeinfer's by more than the tolerance.
* Engine against engine (batch composition, CUDA graphs, kernel backends) uses the reference's own
  top logprobs and NEAR_TIE: two bf16 ulps of a logit of 16-32 (0.25) plus slack; fp16 likewise; fp32
  serve e2e's 1e-2.

``KUBEINFER_CUDA_TEST_DEVICE=cpu`` runs the same checks on a CPU: it only exists to check this file's
logic where there is no GPU (the CUDA-only tests skip there).
"""

from __future__ import annotations

import copy
import gc
import math
import os

import pytest
import torch

DEVICE = os.environ.get("KUBEINFER_CUDA_TEST_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
if not ON_CPU and not torch.cuda.is_available():
    pytest.skip(f"needs a CUDA device (torch {torch.__version__} sees none); `make gpu-check` runs these on a "
                "GPU machine", allow_module_level=True)

if not ON_CPU and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    # tests/conftest.py sets it where /dev/nvidiactl is missing; on a GPU it would interpret the kernels.
    pytest.fail("TRITON_INTERPRET is set on a CUDA machine: the kernels would run in Triton's interpreter; "
                "run with TRITON_INTERPRET=0 (make gpu-check does)", pytrace=False)
transformers = pytest.importorskip("transformers")

from kubeinfer.worker import Engine, EngineConfig, SamplingParams  # noqa: E402
from kubeinfer.worker.kv_sizing import kv_bytes_per_token  # noqa: E402
from tests.conftest import build_tiny_model, write_tokenizer  # noqa: E402

pytestmark = pytest.mark.cuda
cuda_only = pytest.mark.skipif(ON_CPU, reason="about CUDA itself (graphs, the device's memory)")

N = 32  # greedy tokens compared per prompt
PROMPTS = [[5, 17, 99, 3, 250, 7],
           list(range(10, 50)),
           [(i * 37 + 11) % 384 for i in range(97)],
           [(i * 53 + 7) % 384 for i in range(300)]]
OTHERS = [[(i * 29 + 3) % 384 for i in range(n)] for n in (12, 150, 33, 64)]
NEAR_TIE = {"bfloat16": 0.3, "float16": 0.05, "float32": 1e-2}
TOP = 5  # logprobs kept per reference position: a near-tie may hold more than two tokens
# Random models: hidden width and head shapes as in SmolLM2-135M (9/3 heads, d 64) and Llama-8B
# (32/8 would be slow to build; 8/2 keeps d 128 and groups of 4). Small gains keep the network out
# of its chaotic regime, so rounding errors stay small, except for q and k: their larger gain makes
# attention sharp enough that positions matter (with q/k at 0.3, attention was nearly uniform and a
# 10x wrong rope_theta went unnoticed). An untied head scaled x4 spreads the logits.
MEDIUM = {
    "smol-d64": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                     num_key_value_heads=3, rope_theta=100000.0),
    "llama-d128": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, rope_theta=500000.0),
}


def build_medium_model(path: str, shape: dict, seed: int) -> None:
    config = transformers.LlamaConfig(vocab_size=2048, max_position_embeddings=2048, rms_norm_eps=1e-5,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      **shape)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name:
                p.normal_(0.0, 0.2)
            else:
                gain = 4.0 if "lm_head" in name else 1.5 if name.split(".")[-2] in ("q_proj", "k_proj") else 0.3
                p.normal_(0.0, gain / math.sqrt(p.shape[1]))
    model.save_pretrained(path)
    write_tokenizer(path, 384)  # prompts are token ids; ids past the tokenizer's decode to nothing


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = {"tiny-qwen2": str(tmp_path_factory.mktemp("tiny-qwen2"))}
    build_tiny_model(paths["tiny-qwen2"], "qwen2", seed=1)  # q/k/v biases, tied head, 4/2 heads d16
    for i, (name, shape) in enumerate(MEDIUM.items()):
        paths[name] = str(tmp_path_factory.mktemp(name))
        build_medium_model(paths[name], shape, seed=10 + i)
    return paths


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """The fp32 reference must be fp32 (no TF32), and each test starts with the device's memory free."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
    gc.collect()
    if not ON_CPU:
        torch.cuda.empty_cache()


def make_engine(path: str, **kw) -> Engine:
    cfg = dict(model=path, device=DEVICE, dtype="bfloat16", max_model_len=512, num_kv_blocks=256)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def backend_of(engine: Engine) -> str:
    backend = getattr(engine.runner, "backend", None)
    return getattr(backend, "name", None) or getattr(engine.runner, "attention_backend", "?")


def run_with_top(engine: Engine, prompts: list[list[int]], lengths: list[int] | int):
    """Greedy outputs plus, per position, the TOP best logprobs ``{token: logprob}`` (the reference)."""
    lengths = [lengths] * len(prompts) if isinstance(lengths, int) else lengths
    ids = [engine.add_request(prompt_token_ids=p, params=greedy(n, logprobs=TOP)) for p, n in zip(prompts, lengths)]
    tops: dict[str, list[dict[int, float]]] = {i: [] for i in ids}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tops[out.request_id].extend(out.logprobs or [])
            if out.finished:
                final[out.request_id] = out
    assert all(final[i].finish_reason == "length" for i in ids), [final[i].error for i in ids]
    return [final[i].output_token_ids for i in ids], [tops[i] for i in ids]


def assert_greedy_close(ref: list[list[int]], tops: list[list[dict[int, float]]], got: list[list[int]],
                        dtype: str, what: str) -> None:
    """``got`` equals ``ref`` token for token up to a first divergence, which must be a near-tie of the
    reference (one of its TOP best, within NEAR_TIE of its pick); and ties may not cut most of the
    comparison short."""
    matched = total = 0
    for k, (r, top, g) in enumerate(zip(ref, tops, got)):
        assert len(g) == len(r), f"{what}: prompt {k} gave {len(g)} tokens, the reference {len(r)}"
        total += len(r)
        j = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None)
        if j is None:
            matched += len(r)
            continue
        best = top[j]
        gap = best[r[j]] - best.get(g[j], -math.inf)
        assert gap < NEAR_TIE[dtype], (f"{what}: prompt {k} diverged at token {j}: {g[j]} where the reference has "
                                       f"{r[j]}; reference's top {TOP} logprobs {best}: not a near-tie "
                                       f"(< {NEAR_TIE[dtype]})")
        matched += j
    assert matched >= total / 2, f"{what}: only {matched}/{total} tokens compared before near-ties parted the outputs"


# ---- against transformers ---------------------------------------------------------------------------


def first_rows(model, seq: list[int], start: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq], device=DEVICE)).logits[0, start:].float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["tiny-qwen2", "smol-d64", "llama-d128"])
def test_greedy_matches_transformers(models, name, dtype):
    path = models[name]
    engine = make_engine(path, dtype=dtype)  # the defaults: auto kernels (Triton on CUDA), CUDA graphs
    outs = engine.generate(PROMPTS, greedy(N))
    del engine
    low = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(DEVICE).eval()
    exact = copy.deepcopy(low).float()  # the same rounded weights, computed in fp32
    agree_ours = agree_theirs = total = 0
    for k, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        ours = out.output_token_ids
        assert len(ours) == N and out.finish_reason == "length"
        seq = prompt + ours
        lo = first_rows(low, seq, len(prompt) - 1)[:-1]      # logits that chose each of our tokens
        ex = first_rows(exact, seq, len(prompt) - 1)[:-1]
        tol = 2 * (lo - ex).abs().max().item() + 1e-2      # transformers' own error, for each side
        picked = ex.gather(1, torch.tensor(ours, device=ex.device)[:, None])[:, 0]
        below = ex.max(dim=1).values - picked
        worst = int(below.argmax())
        assert below[worst] <= tol, (f"{name} {dtype} prompt {k}: token {worst} ({ours[worst]}) is {below[worst]:.3f} "
                                     f"below the exact greedy pick; transformers' own error is {tol / 2:.3f}")
        truth = ex.argmax(dim=1)
        agree_ours += int((truth == torch.tensor(ours, device=truth.device)).sum())
        agree_theirs += int((lo.argmax(dim=1) == truth).sum())
        total += N
        x = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():  # an explicit mask: else generate masks every prompt token equal to pad_token_id
            ref = low.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        j = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if j is not None:
            # The prefixes agree up to j, so ex[j] holds the exact logits there: the two picks must be a
            # near-tie, or transformers' the worse one (kubeinfer's is checked against ex above).
            gap = (ex[j, ref[j]] - ex[j, ours[j]]).item()
            assert gap <= tol, (f"{name} {dtype} prompt {k}: parted from transformers at token {j} ({ours[j]} vs "
                                f"{ref[j]}); transformers' token is {gap:.3f} better in exact arithmetic "
                                f"(tol {tol:.3f})")
            print(f"{name} {dtype} prompt {k}: parted from transformers at token {j}; exact logits "
                  f"kubeinfer's {ex[j, ours[j]]:.3f}, transformers' {ex[j, ref[j]]:.3f}, best {ex[j].max():.3f}")
    assert agree_ours >= agree_theirs - 0.05 * total and agree_ours >= 0.8 * total, (
        f"{name} {dtype}: kubeinfer picks the exact greedy token {agree_ours}/{total} times, "
        f"transformers {agree_theirs}/{total}")


# ---- engine against engine -----------------------------------------------------------------------


@cuda_only
def test_cuda_engine_runs_on_the_gpu_with_triton(models):
    engine = make_engine(models["smol-d64"])
    assert next(engine.runner.model.parameters()).device.type == "cuda"
    assert backend_of(engine) == "triton"
    out = engine.generate([PROMPTS[0]], greedy(4))[0]
    assert out.finish_reason == "length" and len(out.output_token_ids) == 4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_invariance(models, dtype):
    """A prompt's greedy tokens alone equal its tokens inside a batch of other prompts."""
    engine = make_engine(models["smol-d64"], dtype=dtype)
    alone, tops = [], []
    for prompt in PROMPTS:
        tokens, top = run_with_top(engine, [prompt], N)
        alone += tokens
        tops += top
    batch = OTHERS[:2] + PROMPTS + OTHERS[2:]
    lengths = [N + 9, 7] + [N] * len(PROMPTS) + [N - 5, 3 * N]
    outs = engine.generate(batch, [greedy(n) for n in lengths])
    got = [o.output_token_ids for o in outs[2:2 + len(PROMPTS)]]
    assert_greedy_close(alone, tops, got, dtype, "inside a batch vs alone")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_match_torch_backend(models, scheme):
    """int8 / int4 weights on the default (Triton) kernels give the torch reference path's tokens."""
    path = models["smol-d64"]
    ref = make_engine(path, quantization=scheme, kernel_backend="torch", enforce_eager=True)
    ref_tokens, tops = run_with_top(ref, PROMPTS, N)
    del ref
    engine = make_engine(path, quantization=scheme)
    got = [o.output_token_ids for o in engine.generate(PROMPTS, greedy(N))]
    assert_greedy_close(ref_tokens, tops, got, "bfloat16", f"{scheme} on {backend_of(engine)} vs torch")


def test_int8_kv_cache_matches_torch_backend(models):
    path = models["smol-d64"]
    ref = make_engine(path, kv_cache_dtype="int8", kernel_backend="torch", enforce_eager=True)
    ref_tokens, tops = run_with_top(ref, PROMPTS, N)
    del ref
    engine = make_engine(path, kv_cache_dtype="int8")
    got = [o.output_token_ids for o in engine.generate(PROMPTS, greedy(N))]
    assert_greedy_close(ref_tokens, tops, got, "bfloat16", f"int8 KV on {backend_of(engine)} vs torch")


@cuda_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_match_eager(models, dtype):
    """Decode steps replayed from CUDA graphs give the eager steps' tokens, as the batch shrinks from 8
    to 1 through every size (requests of different lengths finish one by one)."""
    path = models["smol-d64"]
    prompts = PROMPTS + OTHERS
    lengths = [8 + 6 * i for i in range(len(prompts))]
    eager = make_engine(path, dtype=dtype, enforce_eager=True)
    ref_tokens, tops = run_with_top(eager, prompts, lengths)
    del eager
    graphs = make_engine(path, dtype=dtype, enforce_eager=False)
    for _ in range(2):  # the second run replays graphs captured (or warmed) by the first
        got = [o.output_token_ids for o in graphs.generate(prompts, [greedy(n) for n in lengths])]
        assert_greedy_close(ref_tokens, tops, got, dtype, "CUDA graphs vs eager")


@cuda_only
def test_kv_pool_sized_from_gpu_memory_utilization(models):
    """Without a size, the pool takes what gpu_memory_utilization leaves; everything the engine
    allocates (weights, pool, a full batch's activations) then fits in that share of the device."""
    path = models["smol-d64"]
    total = torch.cuda.get_device_properties(torch.device(DEVICE)).total_memory
    blocks = {}
    for util in (0.3, 0.6):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        engine = Engine(EngineConfig(model=path, device=DEVICE, dtype="bfloat16", max_model_len=512,
                                     gpu_memory_utilization=util))
        mc = engine.model_config
        per_block = engine.config.block_size * kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                                                  "bfloat16")
        assert engine.num_kv_blocks > 0
        assert engine.kv_cache_bytes == engine.num_kv_blocks * per_block
        batch = [[(i * 7 + j) % 384 for j in range(200 + i)] for i in range(engine.config.max_num_seqs)]
        outs = engine.generate(batch, greedy(8))
        assert all(len(o.output_token_ids) == 8 for o in outs)
        peak = torch.cuda.max_memory_allocated() - base
        assert peak <= util * total, (f"util {util}: the engine peaked at {peak / 2**30:.2f} GiB, over its "
                                      f"{util * total / 2**30:.2f} GiB share")
        assert engine.kv_cache_bytes >= 0.5 * util * total, (
            f"util {util}: a {engine.kv_cache_bytes / 2**30:.2f} GiB pool leaves most of the "
            f"{util * total / 2**30:.2f} GiB share unused (the weights are ~0.05 GiB)")
        blocks[util] = engine.num_kv_blocks
        del engine, outs
    assert blocks[0.6] > blocks[0.3]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_prefill_prefix_cache_and_preemption(models, dtype):
    """Prompts chunked 64 tokens a step, sharing a 96-token prefix, in a pool too small for all of them
    (so some are preempted and recomputed) give a plain reference's tokens, twice."""
    path = models["smol-d64"]
    shared = [(i * 41 + 5) % 384 for i in range(96)]
    prompts = [shared + [(i * 13 + k) % 384 for i in range(20 + 8 * k)] for k in range(6)]
    ref = make_engine(path, dtype=dtype, kernel_backend="torch", enforce_eager=True, enable_prefix_caching=False,
                      max_num_batched_tokens=1024)
    ref_tokens, tops = run_with_top(ref, prompts, 48)
    del ref
    engine = make_engine(path, dtype=dtype, max_model_len=256, num_kv_blocks=40, max_num_batched_tokens=64)
    for wave in range(2):
        got = [o.output_token_ids for o in engine.generate(prompts, greedy(48))]
        assert_greedy_close(ref_tokens, tops, got, dtype, f"chunked + prefix cache + preemption, wave {wave}")
    stats = engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to be too small for every sequence at once"
    assert stats.prefix_cache_hits > 0
