"""Time the Triton kernels against the torch path on a CUDA device and print achieved bandwidth.

    python benchmarks/triton_kernels.py [--iters 50]

Shapes: SmolLM2-135M (hidden 576, intermediate 1536, 9 heads / 3 KV heads, head_dim 64) and a
7B-like model (4096 x 11008, 32 heads / 8 KV heads, head_dim 128), fp16 activations. GB/s counts
the bytes a kernel must move at least once (quantized weights + activations, or the K/V it reads);
the torch path is charged the same bytes, so the two columns compare directly. Each line also shows
the max abs difference between the two outputs (a correctness smoke test on real hardware). KV
caches use the torch path's heads-first layout ``[kv_heads, num_blocks, block_size, head_dim]``.
Without CUDA it prints "no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable

import torch

from kubeinfer.worker.kernels.attention import AttentionMetadata, PrefillChunk, paged_attention, write_kv

DEVICE = "cuda"
BLOCK_SIZE = 16
GROUP_SIZE = 128
MATMUL_SHAPES = [("smollm2 up 576->1536", 576, 1536), ("smollm2 down 1536->576", 1536, 576),
                 ("7b up 4096->11008", 4096, 11008), ("7b down 11008->4096", 11008, 4096)]
MATMUL_ROWS = (1, 16, 256)
ATTN_MODELS = [("smollm2", 9, 3, 64), ("7b", 32, 8, 128)]  # name, heads, kv heads, head_dim
DECODE_CASES = ((1, 1024), (32, 1024), (64, 4096))  # sequences, context length
PREFILL_CASES = ((1, 2048), (8, 512))  # sequences, prompt length


def bench(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compare(name: str, work: float, unit: str, triton_fn: Callable[[], torch.Tensor],
            torch_fn: Callable[[], torch.Tensor], iters: int) -> None:
    """Print both timings, ``work`` per second (bytes: GB/s, flops: TFLOP/s) and the outputs' max diff."""
    err = (triton_fn().float() - torch_fn().float()).abs().max().item()
    t_tr, t_to = bench(triton_fn, iters), bench(torch_fn, iters)
    per_s = lambda ms: work / ms / (1e6 if unit == "GB/s" else 1e9)  # noqa: E731
    print(f"{name:<40} triton {t_tr * 1e3:8.1f} us {per_s(t_tr):7.1f} {unit} | torch {t_to * 1e3:8.1f} us "
          f"{per_s(t_to):7.1f} {unit} | x{t_to / t_tr:5.2f} | max err {err:.1e}")


def bench_matmuls(iters: int) -> None:
    from kubeinfer.worker.kernels import triton_matmul as tm
    dtype = torch.float16
    linear = torch.nn.functional.linear
    for label, k, n in MATMUL_SHAPES:
        w = torch.randn(n, k, device=DEVICE) * 0.02
        q8, s8 = tm.quantize_int8(w)
        p4, s4, z4 = tm.quantize_int4(w, GROUP_SIZE)
        s4, z4 = s4.to(dtype), z4.to(dtype)
        w16 = w.to(dtype)
        for m in MATMUL_ROWS:
            x = torch.randn(m, k, device=DEVICE, dtype=dtype)
            act = (m * k + m * n) * 2
            # The torch path dequantizes per call (what a framework without fused kernels does).
            compare(f"w8a16 {label} M={m}", q8.numel() + s8.numel() * 4 + act, "GB/s",
                    lambda: tm.w8a16_matmul(x, q8, s8),
                    lambda: linear(x, tm.dequantize_int8(q8, s8).to(dtype)), iters)
            compare(f"w4a16 {label} M={m}", p4.numel() + (s4.numel() + z4.numel()) * 2 + act, "GB/s",
                    lambda: tm.w4a16_matmul(x, p4, s4, z4, GROUP_SIZE),
                    lambda: linear(x, tm.dequantize_int4(p4, s4, z4, GROUP_SIZE).to(dtype)), iters)
            t16 = bench(lambda: linear(x, w16), iters)
            print(f"{'  fp16 dense linear (roofline hint)':<40} {t16 * 1e3:15.1f} us "
                  f"{(w16.numel() * 2 + act) / t16 / 1e6:7.1f} GB/s")


def decode_inputs(num_seqs: int, ctx: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    nb_per_seq = -(-ctx // BLOCK_SIZE)
    num_blocks = num_seqs * nb_per_seq
    k_cache = torch.randn(kv_heads, num_blocks, BLOCK_SIZE, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=DEVICE).view(num_seqs, nb_per_seq)
    lens = torch.full((num_seqs,), ctx, device=DEVICE, dtype=torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, device=DEVICE, dtype=dtype)
    keys = torch.arange(nb_per_seq * BLOCK_SIZE, device=DEVICE)
    mask = (keys[None] >= lens[:, None]).view(1, num_seqs, 1, -1)  # True = padding
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long, device=DEVICE), num_seqs, tables, mask, [])
    return q, k_cache, v_cache, tables, lens, meta


def bench_attention(iters: int) -> None:
    from kubeinfer.worker.kernels import triton_attention as ta
    dtype = torch.float16
    for name, heads, kv_heads, d in ATTN_MODELS:
        scale = d ** -0.5
        for num_seqs, ctx in DECODE_CASES:
            q, kc, vc, bt, lens, meta = decode_inputs(num_seqs, ctx, heads, kv_heads, d, dtype)
            kv_elems = 2 * num_seqs * ctx * kv_heads * d
            compare(f"decode {name} seqs={num_seqs} ctx={ctx}", kv_elems * 2, "GB/s",
                    lambda: ta.paged_decode_attention(q, kc, vc, bt, lens, scale, heads_first=True),
                    lambda: paged_attention(q, None, None, kc, vc, meta, scale), iters)
            kq, ks = ta.quantize_kv_int8(kc)
            vq, vs = ta.quantize_kv_int8(vc)
            compare(f"decode int8kv {name} seqs={num_seqs} ctx={ctx}", kv_elems + kv_elems // d * 4, "GB/s",
                    lambda: ta.paged_decode_attention_int8kv(q, kq, vq, ks, vs, bt, lens, scale,
                                                             heads_first=True),
                    lambda: paged_attention(q, None, None, ta.dequantize_kv_int8(kq, ks, dtype),
                                            ta.dequantize_kv_int8(vq, vs, dtype), meta, scale), iters)
        # Prefill of fresh prompts: the torch path is write_kv + one causal SDPA per sequence.
        for num_seqs, qlen in PREFILL_CASES:
            _, kc, vc, bt, _, _ = decode_inputs(num_seqs, qlen, heads, kv_heads, d, dtype)
            t = num_seqs * qlen
            q = torch.randn(t, heads, d, device=DEVICE, dtype=dtype)
            k = torch.randn(t, kv_heads, d, device=DEVICE, dtype=dtype)
            v = torch.randn_like(k)
            pos = torch.arange(qlen, device=DEVICE)
            slots = (bt[:, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).flatten()
            cu = torch.arange(0, t + 1, qlen, device=DEVICE, dtype=torch.int32)
            ctx = torch.full((num_seqs,), qlen, device=DEVICE, dtype=torch.int32)
            chunks = [PrefillChunk(i * qlen, (i + 1) * qlen, qlen, bt[i], None) for i in range(num_seqs)]
            meta = AttentionMetadata(slots, 0, None, None, chunks)

            def torch_prefill():
                write_kv(kc, vc, k, v, slots)
                return paged_attention(q, k, v, kc, vc, meta, scale)

            flops = 4 * num_seqs * heads * d * qlen * qlen / 2  # causal half of QK^T and PV
            compare(f"prefill {name} seqs={num_seqs} len={qlen}", flops, "TFLOP/s",
                    lambda: ta.prefill_attention(q, k, v, kc, vc, slots, cu, ctx, bt, scale, qlen,
                                                 heads_first=True),
                    torch_prefill, iters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    print(f"device: {torch.cuda.get_device_name()}")
    with torch.inference_mode():
        bench_matmuls(args.iters)
        bench_attention(args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
