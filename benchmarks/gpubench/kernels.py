"""Kernel sections: (c) paged decode attention vs SDPA, (d) HBM bandwidth, achieved and ceiling."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from gpubench.common import Ctx, time_ms

BLOCK_SIZE = 16
ATTN_MODELS = [("smollm2 9/3 d64", 9, 3, 64), ("llama-8b 32/8 d128", 32, 8, 128)]  # q heads, kv heads, d
BATCHES = (1, 16, 64)
CONTEXTS = (512, 2048, 8192)
SMOKE_MODELS = [("smoke 4/2 d16", 4, 2, 16), ("smoke 8/2 d32", 8, 2, 32)]
SMOKE_BATCHES = (1, 2)
SMOKE_CONTEXTS = (32, 80)
MAX_ERR = 2e-2  # bf16 outputs of softmax-weighted N(0, 1) values: rounding is ~4e-3 at most


def paged_inputs(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator):
    """Scatter contiguous ``[B, KVH, L, d]`` K/V into the engine's paged layout (heads first,
    ``[KVH, num_blocks, block_size, d]``) through a random block table (as a long-running pool ends up)."""
    b, kvh, length, d = k.shape
    nb = -(-length // BLOCK_SIZE)
    pad = nb * BLOCK_SIZE - length
    tables = torch.randperm(b * nb, generator=gen, device=k.device).to(torch.int32).view(b, nb)
    caches = []
    for x in (k, v):
        x = F.pad(x, (0, 0, 0, pad)).view(b, kvh, nb, BLOCK_SIZE, d).transpose(0, 1)
        cache = torch.empty(kvh, b * nb, BLOCK_SIZE, d, dtype=x.dtype, device=x.device)
        cache[:, tables.flatten().long()] = x.reshape(kvh, b * nb, BLOCK_SIZE, d)
        caches.append(cache)
    lens = torch.full((b,), length, dtype=torch.int32, device=k.device)
    return caches[0], caches[1], tables, lens


def attention_case(ctx: Ctx, paged_decode_attention, extra_arg: bool, heads: int, kv_heads: int, d: int,
                   batch: int, length: int) -> dict:
    gen = torch.Generator(device=ctx.device).manual_seed(batch * 100003 + length)
    shape = (batch, kv_heads, length, d)
    q = torch.randn(batch, heads, d, generator=gen, device=ctx.device, dtype=ctx.dtype)
    k = torch.randn(shape, generator=gen, device=ctx.device, dtype=ctx.dtype)
    v = torch.randn(shape, generator=gen, device=ctx.device, dtype=ctx.dtype)
    scale = 1 / math.sqrt(d)
    kc, vc, tables, lens = paged_inputs(k, v, gen)
    kw = {"heads_first": True, **({"max_seq_len": length} if extra_arg else {})}

    def ours():
        return paged_decode_attention(q, kc, vc, tables, lens, scale, **kw)

    def sdpa():
        return F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)

    err = (ours().float() - sdpa()[:, :, 0].float()).abs().max().item()
    t_ours, t_sdpa = time_ms(ctx, ours), time_ms(ctx, sdpa)
    kv_bytes = 2 * k.numel() * k.element_size()
    return dict(ours_ms=t_ours, sdpa_ms=t_sdpa, err=err, kv_bytes=kv_bytes)


def section_attention(ctx: Ctx) -> None:
    """(c) kubeinfer's paged decode attention on a block-scattered cache vs torch SDPA on a contiguous
    cache of the same lengths (GQA through enable_gqa: neither side repeats K/V)."""
    try:
        from kubeinfer.worker.kernels.triton_attention import paged_decode_attention, triton
    except ImportError as e:
        raise RuntimeError(f"the Triton kernels cannot be imported: {e}") from e
    if triton is None:
        if ctx.cuda:
            raise RuntimeError("triton is not importable: the paged kernel cannot run")
        print("triton is not installed: only the SDPA side would run; section skipped")
        return
    extra_arg = "max_seq_len" in inspect.signature(paged_decode_attention).parameters
    models, batches, contexts = ((SMOKE_MODELS, SMOKE_BATCHES, SMOKE_CONTEXTS) if ctx.smoke
                                 else (ATTN_MODELS, BATCHES, CONTEXTS))
    copy_bps = copy_bandwidth(ctx)
    print(f"{ctx.dtype}, the engine's heads-first cache, block size {BLOCK_SIZE}, blocks in random order; median times "
          f"({'triton.testing.do_bench, L2 flushed' if ctx.cuda else 'wall clock, interpreter: meaningless'}); "
          f"GB/s counts K+V once; max_seq_len passed: {extra_arg}")
    print(f"{'case':<34} {'kubeinfer':>10} {'SDPA':>10} {'ratio':>7} {'GB/s':>7} {'of copy':>8} {'max err':>8}")
    ratios, wrong = [], 0
    for name, heads, kv_heads, d in models:
        for batch in batches:
            for length in contexts:
                ctx.check_time(2)
                r = attention_case(ctx, paged_decode_attention, extra_arg, heads, kv_heads, d, batch, length)
                ratio = r["ours_ms"] / r["sdpa_ms"]
                ratios.append(ratio)
                gbps = r["kv_bytes"] / r["ours_ms"] / 1e6
                print(f"{name + f' B={batch} L={length}':<34} {r['ours_ms'] * 1e3:8.1f}us {r['sdpa_ms'] * 1e3:8.1f}us "
                      f"{ratio:6.2f}x {gbps:7.0f} {gbps * 1e9 / copy_bps:7.0%} {r['err']:8.1e}"
                      + ("  OUTPUTS DISAGREE" if r["err"] > MAX_ERR else ""))
                wrong += r["err"] > MAX_ERR
                ctx.free()
    within = sum(x <= 1.3 for x in ratios)
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"kubeinfer / SDPA time: worst {max(ratios):.2f}x, geometric mean {geo:.2f}x, "
          f"{within}/{len(ratios)} cases within 1.3x")
    ctx.row("(c) paged decode attention / SDPA, worst case", max(ratios), "x", "<= 1.3x", max(ratios) <= 1.3)
    ctx.row(f"(c) ... cases within 1.3x (of {len(ratios)})", float(within), "")
    if wrong:
        raise AssertionError(f"{wrong} case(s): the paged kernel's output is more than {MAX_ERR} from SDPA's")


def copy_bandwidth(ctx: Ctx) -> float:
    """Bytes/s of a device-to-device copy (read + write counted): the practical HBM ceiling."""
    if "copy_bytes_per_s" not in ctx.results:
        n = (16 << 20) if ctx.smoke else (1 << 30)
        src = torch.empty(n, dtype=torch.uint8, device=ctx.device).random_()
        dst = torch.empty_like(src)
        ms = time_ms(ctx, lambda: dst.copy_(src), reps=100)
        ctx.results["copy_bytes_per_s"] = 2 * n / (ms / 1e3)
        del src, dst
        ctx.free()
    return ctx.results["copy_bytes_per_s"]


def section_bandwidth(ctx: Ctx) -> None:
    """(d) the copy ceiling, and each measured batch-1 decode step's bytes/s as a fraction of it."""
    copy_bps = copy_bandwidth(ctx)
    print(f"device-to-device copy of {16 if ctx.smoke else 1024} MiB: {copy_bps / 1e9:8.1f} GB/s (read + write)")
    ctx.row("(d) device copy bandwidth", copy_bps / 1e9, "GB/s")
    decode = ctx.results.get("decode") or {}
    if not decode:
        print("no decode step was measured (section a did not run): nothing to compare")
    for name, r in decode.items():
        frac = r["bytes_per_s"] / copy_bps
        print(f"kubeinfer {name:<8} batch-1 step {r['step_s'] * 1e3:7.3f} ms reads weights "
              f"{r['weight_bytes'] / 1e6:8.1f} MB + KV {r['kv_bytes'] / 1e6:6.2f} MB: "
              f"{r['bytes_per_s'] / 1e9:7.1f} GB/s = {frac:6.1%} of the copy")
        ctx.row(f"(d) batch-1 decode {name}: achieved / copy bandwidth", frac * 100, "%")
