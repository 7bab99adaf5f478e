"""Time the Triton kernels against the torch path on a CUDA device and print achieved bandwidth.

    python benchmarks/triton_kernels.py [--iters 50] [--only matmul,decode,prefill,norm,graphs]

Shapes: SmolLM2-135M (hidden 576, intermediate 1536, 9 heads / 3 KV heads, head_dim 64) and a
7B-like model (4096 x 11008, 32 heads / 8 KV heads, head_dim 128), fp16 activations. GB/s counts
the bytes a kernel must move at least once (quantized weights + activations, or the K/V it reads);
the torch path is charged the same bytes, so the columns compare directly. Each line also shows the
max abs difference from the torch output (a correctness smoke test on real hardware). KV caches use
the engine's heads-first layout ``[kv_heads, num_blocks, block_size, head_dim]``; int8 caches are
written by the Triton write kernel and read by both paths. Decode lines time the single pass
(``max_seq_len=None``) and the automatic choice (``max_seq_len`` = the context, split-KV when few
sequences run; the line says how many partitions). The ``graphs`` section captures split-KV decode
and split-K W4A16 in CUDA graphs, replays them on new inputs and checks them against eager calls.
Without CUDA it prints "no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from gpubench.common import cuda_event_median_ms  # benchmarks/ is on sys.path when run as a script
from kubeinfer.worker.kernels.attention import (AttentionMetadata, LayerKVCache, PrefillChunk,
                                                gather_workspace_size, paged_attention, write_kv)

DEVICE = "cuda"
BLOCK_SIZE = 16
GROUP_SIZE = 64  # divides every K below (576 rules out 128)
MATMUL_SHAPES = [("smollm2 up 576->1536", 576, 1536), ("smollm2 down 1536->576", 1536, 576),
                 ("7b up 4096->11008", 4096, 11008), ("7b down 11008->4096", 11008, 4096)]
MATMUL_ROWS = (1, 16, 256)
ATTN_MODELS = [("smollm2", 9, 3, 64), ("7b", 32, 8, 128)]  # name, heads, kv heads, head_dim
DECODE_CASES = ((1, 1024), (1, 8192), (32, 1024), (64, 4096))  # sequences, context length
PREFILL_CASES = ((1, 2048), (8, 512))  # sequences, prompt length
NORM_ROWS = (1, 256, 4096)


def bench(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events after a warm-up."""
    return cuda_event_median_ms(fn, iters)


def compare(name: str, work: float, unit: str, variants: dict[str, Callable[[], torch.Tensor]],
            torch_fn: Callable[[], torch.Tensor], iters: int) -> None:
    """Print each variant's time, ``work`` per second (bytes: GB/s, flops: TFLOP/s), speed-up over the
    torch path and max abs difference from its output, then the torch path's own line."""
    per_s = lambda ms: work / ms / (1e6 if unit == "GB/s" else 1e9)  # noqa: E731
    expected = torch_fn().float()
    t_to = bench(torch_fn, iters)
    for label, fn in variants.items():
        err = (fn().float() - expected).abs().max().item()
        t = bench(fn, iters)
        print(f"{name:<44} {label:<14} {t * 1e3:9.1f} us {per_s(t):8.1f} {unit} x{t_to / t:6.2f} "
              f"max err {err:.1e}")
    print(f"{name:<44} {'torch':<14} {t_to * 1e3:9.1f} us {per_s(t_to):8.1f} {unit}")


def bench_matmuls(iters: int) -> None:
    from kubeinfer.worker.kernels import triton_matmul as tm
    from kubeinfer.worker.quant import get_scheme
    dtype = torch.float16
    int8, int4 = get_scheme("int8"), get_scheme("int4", GROUP_SIZE)
    for label, k, n in MATMUL_SHAPES:
        w = torch.randn(n, k, device=DEVICE) * 0.02
        s8, s4 = int8.quantize(w), int4.quantize(w)
        w16 = w.to(dtype)
        for m in MATMUL_ROWS:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            act = (m * k + m * n) * 2
            split = f"split-K {tm.split_k(m, n, k, x.device)}"
            # The torch path dequantizes per call (what a framework without fused kernels does).
            compare(f"w8a16 {label} M={m}", s8["qweight"].numel() + n * 4 + act, "GB/s",
                    {split: lambda: tm.w8a16_matmul(x, s8["qweight"], s8["scales"])},
                    lambda: F.linear(x, int8.dequantize(s8).to(dtype)), iters)
            compare(f"w4a16 {label} M={m}", s4["qweight"].numel() + s4["scales"].numel() * 4 + act, "GB/s",
                    {split: lambda: tm.w4a16_matmul(x, s4["qweight"], s4["scales"], s4["mins"], GROUP_SIZE)},
                    lambda: F.linear(x, int4.dequantize(s4).to(dtype)), iters)
            t16 = bench(lambda: F.linear(x, w16), iters)
            print(f"{'  fp16 dense linear (roofline hint)':<59} {t16 * 1e3:9.1f} us "
                  f"{(w16.numel() * 2 + act) / t16 / 1e6:8.1f} GB/s")


def kv_cache(kv_heads: int, num_blocks: int, head_dim: int, dtype: torch.dtype, int8: bool) -> LayerKVCache:
    """A heads-first cache filled with random K/V (quantized by the Triton write kernel when int8)."""
    from kubeinfer.worker.kernels import triton_attention as ta
    shape = (kv_heads, num_blocks, BLOCK_SIZE, head_dim)
    if not int8:
        return LayerKVCache(torch.randn(shape, device=DEVICE, dtype=dtype), torch.randn(shape, device=DEVICE,
                                                                                         dtype=dtype))
    cache = LayerKVCache(torch.empty(shape, device=DEVICE, dtype=torch.int8),
                         torch.empty(shape, device=DEVICE, dtype=torch.int8),
                         torch.empty(shape[:3], device=DEVICE), torch.empty(shape[:3], device=DEVICE))
    slots = torch.arange(num_blocks * BLOCK_SIZE, device=DEVICE)
    for s in slots.split(1 << 16):
        k = torch.randn(len(s), kv_heads, head_dim, device=DEVICE, dtype=dtype)
        ta.write_kv_cache(k, torch.randn_like(k), cache.k, cache.v, s, heads_first=True,
                          k_scales=cache.k_scale, v_scales=cache.v_scale)
    return cache


def scales_kw(cache: LayerKVCache) -> dict:
    return {} if cache.k_scale is None else {"k_scales": cache.k_scale, "v_scales": cache.v_scale}


def decode_inputs(num_seqs: int, ctx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                  int8: bool):
    nb_per_seq = -(-ctx // BLOCK_SIZE)
    cache = kv_cache(kv_heads, num_seqs * nb_per_seq, head_dim, dtype, int8)
    tables = torch.randperm(num_seqs * nb_per_seq, device=DEVICE).view(num_seqs, nb_per_seq).to(torch.int32)
    lens = torch.full((num_seqs,), ctx, device=DEVICE, dtype=torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, device=DEVICE, dtype=dtype)
    keys = torch.arange(nb_per_seq * BLOCK_SIZE, device=DEVICE)
    mask = (keys[None] >= lens[:, None]).view(1, num_seqs, 1, -1)  # True = padding
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long, device=DEVICE), num_seqs, tables.long(), mask, [])
    if int8:  # the torch path dequantizes its gathers into these (in q's dtype, which its matmuls need)
        size = gather_workspace_size(cache.k, num_seqs * nb_per_seq)
        meta.key_workspace = torch.empty(size, device=DEVICE, dtype=dtype)
        meta.value_workspace = torch.empty(size, device=DEVICE, dtype=dtype)
    return q, cache, tables, lens, meta


def bench_decode(iters: int) -> None:
    from kubeinfer.worker.kernels import triton_attention as ta
    dtype = torch.float16
    for name, heads, kv_heads, d in ATTN_MODELS:
        scale = d ** -0.5
        for num_seqs, ctx in DECODE_CASES:
            for int8 in (False, True):
                q, cache, bt, lens, meta = decode_inputs(num_seqs, ctx, heads, kv_heads, d, dtype, int8)
                kw = scales_kw(cache)
                kv_bytes = 2 * num_seqs * ctx * kv_heads * d * (1 if int8 else 2) + (
                    2 * num_seqs * ctx * kv_heads * 4 if int8 else 0)
                parts = ta.decode_partitions(num_seqs, kv_heads, ctx, q.device)
                compare(f"decode{' int8kv' if int8 else ''} {name} seqs={num_seqs} ctx={ctx}", kv_bytes, "GB/s",
                        {"single pass": lambda: ta.paged_decode_attention(q, cache.k, cache.v, bt, lens, scale,
                                                                          heads_first=True, **kw),
                         f"auto ({parts} part)": lambda: ta.paged_decode_attention(
                             q, cache.k, cache.v, bt, lens, scale, heads_first=True, max_seq_len=ctx, **kw)},
                        lambda: paged_attention(q, None, None, cache, meta, scale), iters)
                del q, cache, bt, lens, meta


def bench_prefill(iters: int) -> None:
    """Fresh prompts: the torch path is write_kv + one causal SDPA per sequence."""
    from kubeinfer.worker.kernels import triton_attention as ta
    dtype = torch.float16
    for name, heads, kv_heads, d in ATTN_MODELS:
        scale = d ** -0.5
        for num_seqs, qlen in PREFILL_CASES:
            for int8 in (False, True):
                _, cache, bt, _, _ = decode_inputs(num_seqs, qlen, heads, kv_heads, d, dtype, int8)
                t = num_seqs * qlen
                q = torch.randn(t, heads, d, device=DEVICE, dtype=dtype)
                k = torch.randn(t, kv_heads, d, device=DEVICE, dtype=dtype)
                v = torch.randn_like(k)
                pos = torch.arange(qlen, device=DEVICE)
                slots = (bt[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
                cu = torch.arange(0, t + 1, qlen, device=DEVICE, dtype=torch.int32)
                ctx = torch.full((num_seqs,), qlen, device=DEVICE, dtype=torch.int32)
                chunks = [PrefillChunk(i * qlen, (i + 1) * qlen, qlen, bt[i].long(), None) for i in range(num_seqs)]
                meta = AttentionMetadata(slots, 0, None, None, chunks)

                def torch_prefill():
                    write_kv(cache, k, v, slots)
                    return paged_attention(q, k, v, cache, meta, scale)

                flops = 4 * num_seqs * heads * d * qlen * qlen / 2  # causal half of QK^T and PV
                # With int8 the Triton kernel attends to the quantized keys, torch to the fresh ones:
                # the max err then includes the quantization error.
                compare(f"prefill{' int8kv' if int8 else ''} {name} seqs={num_seqs} len={qlen}", flops,
                        "TFLOP/s",
                        {"triton": lambda: ta.prefill_attention(q, k, v, cache.k, cache.v, slots, cu, ctx, bt,
                                                                scale, qlen, heads_first=True, **scales_kw(cache))},
                        torch_prefill, iters)


def bench_norms(iters: int) -> None:
    from kubeinfer.worker.kernels import triton_norm as tn
    from kubeinfer.worker.models.rope import apply_rotary
    dtype = torch.float16
    for name, heads, kv_heads, d in ATTN_MODELS:
        hidden, inter = (576, 1536) if name == "smollm2" else (4096, 11008)
        w = torch.randn(hidden, device=DEVICE, dtype=dtype)
        for t in NORM_ROWS:
            x = torch.randn(t, hidden, device=DEVICE, dtype=dtype)
            res = torch.randn_like(x)
            nbytes = x.numel() * 2
            compare(f"rms_norm {name} T={t}", 2 * nbytes, "GB/s", {"triton": lambda: tn.rms_norm(x, w, 1e-5)},
                    lambda: F.rms_norm(x, (hidden,), w, 1e-5), iters)
            # Both variants add into a scratch copy, so repeated calls do not grow the residual.
            scratch = res.clone()
            compare(f"add_rms_norm_ {name} T={t}", 4 * nbytes, "GB/s",
                    {"triton": lambda: tn.add_rms_norm_(x, scratch.copy_(res), w, 1e-5)},
                    lambda: F.rms_norm(scratch.copy_(res).add_(x), (hidden,), w, 1e-5), iters)
            qkv = torch.randn(t, heads + 2 * kv_heads, d, device=DEVICE, dtype=dtype)
            cos = torch.randn(t, 1, d, device=DEVICE, dtype=dtype)
            sin = torch.randn_like(cos)
            rotated = heads + kv_heads
            work = qkv.clone()

            def triton_rotary():
                tn.rotary_(work.copy_(qkv), cos, sin, rotated)
                return work[:, :rotated]

            compare(f"rotary_ {name} T={t}", 2 * t * rotated * d * 2, "GB/s", {"triton (+copy)": triton_rotary},
                    lambda: apply_rotary(qkv[:, :rotated], cos, sin), iters)
            gate_up = torch.randn(t, 2 * inter, device=DEVICE, dtype=dtype)
            compare(f"silu_mul {name} T={t}", gate_up.numel() * 3, "GB/s",
                    {"triton": lambda: tn.silu_mul(gate_up)},
                    lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:], iters)


def check_graphs() -> None:
    """Split-KV decode and split-K W4A16 captured in CUDA graphs: replayed on new lengths / inputs
    (written in place), they must match eager calls."""
    from kubeinfer.worker.kernels import triton_attention as ta
    from kubeinfer.worker.kernels import triton_matmul as tm
    from kubeinfer.worker.quant import get_scheme
    dtype, max_len = torch.float16, 4096
    for int8 in (False, True):
        q, cache, bt, lens, _ = decode_inputs(2, max_len, 9, 3, 64, dtype, int8)
        kw = scales_kw(cache)
        assert ta.decode_partitions(2, 3, max_len, q.device) > 1
        run = lambda: ta.paged_decode_attention(q, cache.k, cache.v, bt, lens, 0.125, heads_first=True,  # noqa: E731
                                                max_seq_len=max_len, **kw)
        run()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        lens.copy_(torch.tensor([37, 3000], device=DEVICE, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        err = (out.float() - run().float()).abs().max().item()
        print(f"cuda graph: split-KV decode{' int8kv' if int8 else ''} replay vs eager max err {err:.1e}"
              f" {'OK' if err == 0 else 'MISMATCH'}")
    scheme = get_scheme("int4", GROUP_SIZE)
    s4 = scheme.quantize(torch.randn(576, 1536, device=DEVICE) * 0.02)
    x = torch.randn(1, 1536, device=DEVICE, dtype=dtype)
    run = lambda: tm.w4a16_matmul(x, s4["qweight"], s4["scales"], s4["mins"], GROUP_SIZE)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    err = (out.float() - run().float()).abs().max().item()
    print(f"cuda graph: split-K ({tm.split_k(1, 576, 1536, x.device)}) w4a16 replay vs eager max err {err:.1e}"
          f" {'OK' if err == 0 else 'MISMATCH'}")


SECTIONS = {"graphs": lambda iters: check_graphs(), "matmul": bench_matmuls, "decode": bench_decode,
            "prefill": bench_prefill, "norm": bench_norms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        for section in args.only.split(","):
            SECTIONS[section.strip()](args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
