"""RMSNorm, residual-add RMSNorm, rotary and SwiGLU Triton kernels against the torch formulas the
model uses (F.rms_norm, models.rope.apply_rotary, F.silu), run on the CPU through the Triton
interpreter (see tests/triton_interp.py)."""

from __future__ import annotations

import pytest

from tests.triton_interp import assert_close, tn, triton_interpreter  # noqa: F401 (autouse fixture)

import torch  # noqa: E402  (after triton_interp: TRITON_INTERPRET must be set before triton is imported)
import torch.nn.functional as F  # noqa: E402

from kubeinfer.worker.models.config import ModelConfig  # noqa: E402
from kubeinfer.worker.models.rope import RotaryEmbedding, apply_rotary  # noqa: E402

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
H = 72  # not a power of two: the row tile is masked


def rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), w.shape, w.float(), eps)


@DTYPES
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    wide = (torch.randn(5, H + 8, generator=gen) * 3).to(dtype)
    x = wide[:, 4:4 + H]  # strided rows
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    out = tn.rms_norm(x, w, 1e-5)
    assert out.shape == (5, H) and out.is_contiguous()
    assert_close(out, rms_ref(x, w, 1e-5), dtype)
    assert tn.rms_norm(x[:0], w, 1e-5).shape == (0, H)


@DTYPES
def test_add_rms_norm_(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, H, generator=gen).to(dtype)
    residual = (torch.randn(4, H, generator=gen) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(H, generator=gen)).to(dtype)
    stream = x + residual  # rounded to the dtype, as the kernel stores it
    out = tn.add_rms_norm_(x, residual, w, 1e-6)
    assert torch.equal(residual, stream)
    assert_close(out, rms_ref(stream, w, 1e-6), dtype)


@DTYPES
def test_rotary_(dtype):
    """In place on the first q+k heads of a strided [T, heads, d] view; v heads untouched; cos/sin
    from RotaryEmbedding.lookup (and as strided row views)."""
    heads, kv, d, t = 4, 2, 32, 6
    config = ModelConfig(family="llama", vocab_size=16, hidden_size=heads * d, intermediate_size=8, num_layers=1,
                         num_heads=heads, num_kv_heads=kv, head_dim=d, rope_theta=10000.0)
    rope = RotaryEmbedding(config, 64, dtype)
    positions = torch.tensor([0, 5, 6, 7, 40, 63])
    gen = torch.Generator().manual_seed(2)
    buf = torch.randn(t, heads + 2 * kv + 1, d, generator=gen).to(dtype)
    qkv = buf[:, 1:]  # token stride != heads * d
    ref, before = qkv.clone(), buf[:, 0].clone()
    cos, sin = rope.lookup(positions)
    ref[:, :heads + kv] = apply_rotary(ref[:, :heads + kv].float(), cos.float(), sin.float()).to(dtype)
    tn.rotary_(qkv, cos, sin, heads + kv)
    assert_close(qkv[:, :heads + kv], ref[:, :heads + kv].float(), dtype)
    assert torch.equal(qkv[:, heads + kv:], ref[:, heads + kv:])
    assert torch.equal(buf[:, 0], before)  # the head before the view is outside it
    # Strided row views of a wider table (e.g. cos/sin slices of one [T, 2d] buffer).
    table = torch.cat((rope.cos[positions], rope.sin[positions]), dim=1)
    x = buf[:, 1:].clone()
    expect = apply_rotary(x[:, :heads].float(), cos.float(), sin.float()).to(dtype)
    tn.rotary_(x, table[:, :d].unsqueeze(1), table[:, d:], heads)
    assert_close(x[:, :heads], expect.float(), dtype)


@DTYPES
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(3)
    inter = 1100  # two column blocks in the interpreter, the second masked
    gate_up = (torch.randn(3, 2 * inter + 6, generator=gen) * 3).to(dtype)[:, 6:]  # strided rows
    out = tn.silu_mul(gate_up)
    g, u = gate_up.float().split(inter, dim=-1)
    assert out.shape == (3, inter) and out.is_contiguous()
    assert_close(out, F.silu(g) * u, dtype)
