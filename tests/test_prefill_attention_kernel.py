"""The C++ prefill attention (kernels/prefill_attention.cpp) against SDPA on the same K/V, at every ISA
tier this CPU runs: chunks from position 0 and after a cached prefix, grouped-query heads, tiles that
end mid-way, block sizes that are no multiple of the kernel's vector width, and decode rows left alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubeinfer.worker import Engine, SamplingParams


def _reference(q, k_cache, v_cache, chunks, scale):
    """SDPA per chunk in fp32 on the keys gathered from the cache: chunk rows are the last positions
    of their context, each seeing the keys up to its own position."""
    kvh, _, bs, d = k_cache.shape
    out = torch.zeros(q.shape, dtype=torch.float32)
    for start, n, ctx, table in chunks:
        ids = table[: -(-ctx // bs)]
        keys = k_cache.float()[:, ids].reshape(kvh, -1, d)[:, :ctx]
        values = v_cache.float()[:, ids].reshape(kvh, -1, d)[:, :ctx]
        pos = torch.arange(ctx - n, ctx)
        mask = torch.arange(ctx)[None] <= pos[:, None]
        o = F.scaled_dot_product_attention(q[start:start + n].float().transpose(0, 1)[None], keys[None], values[None],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
    return out


def _step(decodes, chunk_specs, heads, kvh, d, bs, dtype, seed):
    """A step's batch: ``decodes`` rows of one query, then one chunk per (queries, context) spec."""
    torch.manual_seed(seed)
    width = max(-(-ctx // bs) for _, ctx in chunk_specs)
    nb = width * (len(chunk_specs) + decodes) + 3
    k_cache = torch.randn(kvh, nb, bs, d).to(dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(nb)
    specs = [(1, 1)] * decodes + list(chunk_specs)
    tables = torch.zeros(len(specs), width, dtype=torch.long)
    cu, lens, chunks, row = [0], [], [], 0
    for i, (n, ctx) in enumerate(specs):
        tables[i] = perm[i * width:(i + 1) * width]
        if i >= decodes:
            chunks.append((row, n, ctx, tables[i]))
        row += n
        cu.append(row)
        lens.append(ctx)
    q = torch.randn(row, heads + 2 * kvh, d).to(dtype)[:, :heads]  # a strided view, as the model's
    return q, k_cache, v_cache, torch.tensor(cu), torch.tensor(lens), tables, chunks


CASES = [  # (decodes, [(queries, context)], heads, kv heads, head_dim, block size)
    (0, [(7, 7)], 9, 3, 64, 16),                           # one chunk from position 0, a partial tile
    (2, [(40, 40), (5, 300), (1, 17)], 9, 3, 64, 16),      # after decodes; a chunk after a prefix; one query
    (0, [(130, 130), (64, 200)], 9, 3, 64, 16),            # several tiles, a last tile of 2 positions
    (1, [(33, 33), (20, 61)], 8, 2, 128, 16),              # head_dim 128, a group of 4
    (0, [(50, 50), (9, 77)], 4, 2, 16, 24),                # the tiny test model's heads; blocks of 24
    (0, [(19, 45)], 7, 1, 32, 8),                          # blocks smaller than a vector of keys
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefill_attention_matches_sdpa(kernels, case, dtype):
    decodes, specs, heads, kvh, d, bs = CASES[case]
    q, kc, vc, cu, lens, tables, chunks = _step(decodes, specs, heads, kvh, d, bs, dtype, seed=case)
    assert kernels.prefill_attention_supports(d)
    out = torch.full(q.shape, 7.0, dtype=dtype)
    kernels.prefill_attention(q, kc, vc, cu, lens, tables, decodes, 0.125, out)
    want = _reference(q, kc, vc, chunks, 0.125)
    assert torch.equal(out[:decodes], torch.full_like(out[:decodes], 7.0))  # decode rows are not touched
    if dtype == torch.float32:
        torch.testing.assert_close(out[decodes:], want[decodes:], rtol=1e-5, atol=1e-5)
    else:  # fp32 math on the bf16 inputs, rounded once
        torch.testing.assert_close(out[decodes:].float(), want[decodes:], rtol=2 ** -8, atol=1e-5)


def test_prefill_attention_refuses_what_does_not_fit(kernels):
    q, kc, vc, cu, lens, tables, _ = _step(0, [(10, 30)], 4, 2, 64, 16, torch.float32, seed=0)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.prefill_attention(q, kc, vc, cu, torch.tensor([5]), tables, 0, 0.125, out)  # 10 queries, context 5
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.prefill_attention(q, kc, vc, cu, torch.tensor([10 ** 6]), tables, 0, 0.125, out)
    bad = tables.clone()
    bad[0, 0] = kc.shape[1]
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        kernels.prefill_attention(q, kc, vc, cu, lens, bad, 0, 0.125, out)
    with pytest.raises(RuntimeError, match="within the batch"):
        kernels.prefill_attention(q, kc, vc, torch.tensor([0, 11]), lens, tables, 0, 0.125, out)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.prefill_attention(q, kc.bfloat16(), vc.bfloat16(), cu, lens, tables, 0, 0.125, out)
    assert not kernels.prefill_attention_supports(20)  # no multiple of either vector width


def test_engine_steps_past_the_kernels_context_bound_take_sdpa(tiny_llama_dir):
    """The AVX2 build hands steps with a long prefill to SDPA (CppBackend's per-step choice); with the
    bound lowered to 40 tokens, prompts on both sides of it (chunked, two sharing a prefix)
    give the torch path's greedy tokens, and both paths ran."""
    from kubeinfer.worker.kernels.cpu import load_cpu_kernels
    if load_cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels could not be built (no compiler?)")
    prompts = [[5, 17, 99, 3, 250] * 3, [7, 11, 13, 200] * 20, [7, 11, 13, 200] * 20 + [9, 9]]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True) for _ in prompts]
    kwargs = dict(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=32)
    want = [o.output_token_ids for o in Engine(**kwargs, kernel_backend="torch").generate(prompts, params)]
    engine = Engine(**kwargs, kernel_backend="cpp")
    engine.backend._prefill_max_context = 40
    chose = []  # per step with prefills: whether the kernel took it
    metadata = engine.backend.attention_metadata

    def recording(step, caches):
        meta = metadata(step, caches)
        if step.prefills:
            chose.append(meta.cu_seqlens_q is not None)
        return meta
    engine.backend.attention_metadata = recording
    got = [o.output_token_ids for o in engine.generate(prompts, params)]
    assert got == want
    assert True in chose and False in chose
