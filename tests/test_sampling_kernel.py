"""The C++ sampling kernel (kernels/sampling_kernel.cpp) against the sampler's torch path, at every ISA
tier this CPU runs: the same filters (top-k, top-p, min-p, ties kept) and the same inverse-CDF draw
from the same uniforms."""

from __future__ import annotations

import math

import pytest
import torch

from kubeinfer.worker import SamplingParams
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.sampling import Sampler, SamplingBatch, apply_min_p, apply_top_k_top_p

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None,
                                reason="the C++ CPU kernels could not be built (no compiler?)")


def _rows(vocab: int) -> torch.Tensor:
    """Logit rows that exercise the filters: peaked, flat, many ties, masked tokens, one allowed token."""
    g = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=g) * 4,                 # peaked: a narrow nucleus
            torch.randn(vocab, generator=g) * 0.3,               # flat: a nucleus of most of the vocabulary
            (torch.randn(vocab, generator=g) * 2).round(),        # ties everywhere, also at the thresholds
            torch.randn(vocab, generator=g)]
    rows[3][1::3] = -math.inf                                     # a grammar mask
    one = torch.full((vocab,), -math.inf)
    one[vocab // 2] = 1.0                                         # a single allowed token
    return torch.stack(rows + [one])


# (temperature, top_k, top_p, min_p); 0 / 1 / 0 mean off.
SETTINGS = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.3, 0, 0.5, 0.0),
            (1.0, 40, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.9, 20, 0.95, 0.05), (1e-5, 0, 0.9, 0.0), (1.0, 1, 1.0, 0.0)]


def _reference_probs(logits: torch.Tensor, t: float, k: int, p: float, min_p: float) -> torch.Tensor:
    """The torch path's filtered distribution, float64."""
    rows, k = len(logits), min(k, logits.shape[1])  # SamplingBatch clamps top_k to the vocabulary
    x = logits.float() / torch.full((rows, 1), t)
    top_k = torch.full((rows,), k, dtype=torch.long) if k else None
    top_p = torch.full((rows,), p) if p < 1 else None
    if top_k is not None or top_p is not None:
        x = apply_top_k_top_p(x, top_k, top_p, k)
    if min_p:
        x = apply_min_p(x, torch.full((rows,), min_p))
    return x.double().softmax(-1)


def _check_draws(tokens: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor) -> None:
    """Each token is the inverse-CDF answer for its uniform: a token of positive probability whose
    cumulative interval holds u (within float rounding at the edges)."""
    cum = probs.cumsum(-1)
    for row, (token, u) in enumerate(zip(tokens.tolist(), uniforms.tolist())):
        assert probs[row, token] > 0, (row, token, "a filtered-out token was drawn")
        lo, hi = float(cum[row, token] - probs[row, token]), float(cum[row, token])
        assert lo - 1e-5 <= u <= hi + 1e-5, (row, token, u, lo, hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 33, 4099])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "t{}-k{}-p{}-minp{}".format(*s))
def test_every_draw_is_the_torch_paths_inverse_cdf(kernels, dtype, vocab, setting):
    t, k, p, min_p = setting
    logits = _rows(vocab).to(dtype)
    probs = _reference_probs(logits, t, k, p, min_p)
    rows = len(logits)
    args = (torch.full((rows,), t), torch.full((rows,), k, dtype=torch.long) if k else None,
            torch.full((rows,), p) if p < 1 else None, torch.full((rows,), min_p) if min_p else None)
    randoms = torch.rand(20, generator=torch.Generator().manual_seed(1)).tolist()
    for u in [0.0, 1e-9, 0.25, 0.5, 0.999, 1 - 2 ** -53] + randoms:
        uniforms = torch.full((rows,), u, dtype=torch.float64)
        _check_draws(kernels.sample_rows(logits, *args, uniforms), probs, uniforms)
    # The middle of every kept token's interval draws that very token: the kept sets are the same.
    cum = probs.cumsum(-1)
    for row in range(rows):
        kept = (probs[row] > 1e-6).nonzero().flatten()
        for token in kept[:300].tolist():
            u = float(cum[row, token] - probs[row, token] / 2)
            uniforms = torch.zeros(rows, dtype=torch.float64)
            uniforms[row] = u
            assert int(kernels.sample_rows(logits, *args, uniforms)[row]) == token, (row, token)


def test_rows_keep_their_own_settings_and_strided_rows_are_read_in_place(kernels):
    logits = _rows(1000)
    wide = torch.cat([logits, logits], dim=1)[:, :1000]  # rows of a wider tensor
    rows = len(logits)
    t = torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0])
    k = torch.tensor([0, 3, 0, 10, 0])
    p = torch.tensor([0.9, 1.0, 0.6, 1.0, 0.5])
    min_p = torch.tensor([0.0, 0.0, 0.2, 0.0, 0.0])
    uniforms = torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = kernels.sample_rows(wide, t, k, p, min_p, uniforms)
    for row in range(rows):
        probs = _reference_probs(logits[row:row + 1], float(t[row]), int(k[row]), float(p[row]), float(min_p[row]))
        _check_draws(got[row:row + 1], probs, uniforms[row:row + 1])


def test_a_nan_row_draws_its_nan_and_bad_arguments_are_refused(kernels):
    logits = torch.randn(2, 50)
    logits[1, 7] = float("nan")
    ones = torch.ones(2)
    out = kernels.sample_rows(logits, ones, None, None, None, torch.full((2,), 0.5, dtype=torch.float64))
    assert int(out[1]) == 7
    with pytest.raises(RuntimeError, match="uniforms must be"):
        kernels.sample_rows(logits, ones, None, None, None, torch.full((2,), 0.5))
    with pytest.raises(RuntimeError, match="one value per row"):
        kernels.sample_rows(logits, ones, torch.ones(3, dtype=torch.long), None, None,
                            torch.full((2,), 0.5, dtype=torch.float64))


def test_the_sampler_with_the_kernel_draws_what_its_torch_path_draws():
    """Same engine generator and request seeds: the same tokens, greedy rows and seeded rows included,
    and a penalty (applied before the kernel) too."""
    kernels = load_cpu_kernels()
    vocab = 3000
    logits = (torch.randn(6, vocab, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_k=50, seed=7), SamplingParams(temperature=0.7, min_p=0.05),
              SamplingParams(temperature=1.0, repetition_penalty=1.3), SamplingParams(temperature=1.2, seed=9)]

    def run(sample_rows):
        generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]
        batch = SamplingBatch.build(params, [[1, 2, 3]] * 6, [[4, 5]] * 6, generators, vocab)
        sampler = Sampler(kernels.greedy_argmax, generator=torch.Generator().manual_seed(0), sample_rows=sample_rows)
        return torch.cat([sampler(logits, batch).token_ids for _ in range(20)])

    with_kernel, torch_path = run(kernels.sample_rows), run(None)
    assert (with_kernel == torch_path).float().mean() >= 0.99, (with_kernel, torch_path)
    assert len(set(with_kernel.tolist())) > 6  # it did sample
