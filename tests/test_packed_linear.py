"""bf16 linears prepacked for oneDNN or for the AMX kernel (kernels/packed_linear.py, amx_linear.cpp)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from kubeinfer.worker import Engine
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.kernels.packed_linear import PackedLinear, amx_kernels, pack_bf16_linears, packing_supported
from kubeinfer.worker.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this CPU or torch build has no oneDNN bf16 matmul")
AMX = amx_kernels(load_cpu_kernels())
needs_amx = pytest.mark.skipif(AMX is None, reason="no AMX here (CPU, OS or the C++ kernels' build)")


def _assert_rounded_once(got: torch.Tensor, exact: torch.Tensor) -> None:
    """got (bf16) is the exact result rounded once to bf16, give or take fp32 summation order."""
    assert got.dtype == torch.bfloat16
    exact = exact.detach()
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=2 ** -12 * float(exact.abs().max()))


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_the_plain_one(rows, bias):
    linear = nn.Linear(96, 200, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    packed = PackedLinear(linear.weight, linear.bias)
    # Same oneDNN kernel, weight in its layout ahead of time: the same bits.
    assert torch.equal(packed(x), linear(x))
    assert packed.weight_nbytes == 200 * 96 * 2


def test_packed_linear_rejects_what_it_does_not_run():
    with pytest.raises(ValueError, match="bf16 CPU weight"):
        PackedLinear(torch.randn(8, 8))
    packed = PackedLinear(torch.randn(8, 8).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"expects bf16 \[T, 8\], got torch.float32"):
        packed(torch.randn(2, 8))


def test_bf16_engine_packs_every_linear_and_keeps_state_dict_clean(tiny_llama_dir):
    engine = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, dtype="bfloat16")
    model = engine.runner.model
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert not model.config.tie_word_embeddings  # so the head is a linear too
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 4 * model.config.num_layers + 1
    logits = model.compute_logits(torch.zeros(3, model.config.hidden_size, dtype=torch.bfloat16))
    assert logits.shape == (3, model.config.vocab_size) and logits.dtype == torch.float32
    assert all(t.layout == torch.strided for t in model.state_dict().values())  # packed weights stay private
    fp32 = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16)
    assert not any(isinstance(m, PackedLinear) for m in fp32.runner.model.modules())
    assert pack_bf16_linears(fp32.runner.model) == 0  # fp32 weights are left alone


def test_tied_head_gets_a_packed_copy_and_logits_do_not_change(tiny_llama_dir):
    config = dataclasses.replace(Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16).model_config,
                                 tie_word_embeddings=True)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config, 128, torch.bfloat16).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    assert packed.pack_bf16_weights() == 4 * config.num_layers + 1
    assert plain.lm_head is None and isinstance(packed.lm_head, PackedLinear)
    assert torch.equal(packed.embed_tokens.weight, plain.embed_tokens.weight)  # lookups keep the plain table
    hidden = torch.randn(5, config.hidden_size).to(torch.bfloat16)
    assert torch.equal(packed.compute_logits(hidden), plain.compute_logits(hidden))


# Rows 1, 7, 17 and 300 end in a partial 16-row tile (read from a padded copy), 300 spans several
# 32-row blocks; 200 and 16 output columns end in a partial 32-column panel.
@needs_amx
@pytest.mark.parametrize("rows", [1, 7, 17, 64, 300])
@pytest.mark.parametrize("out_features,bias", [(200, False), (200, True), (16, True), (256, False)])
def test_amx_linear_is_the_exact_product_rounded_once(rows, out_features, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, out_features, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    packed = PackedLinear(linear.weight, linear.bias, amx=AMX)
    assert packed.amx is not None
    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
    _assert_rounded_once(packed(x), exact)


@needs_amx
@pytest.mark.parametrize("rows,bias", [(1, False), (33, True), (300, False)])
def test_amx_swiglu_returns_the_gated_product(rows, bias):
    torch.manual_seed(rows)
    inter = 48
    linear = nn.Linear(64, 2 * inter, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 64).to(torch.bfloat16)
    fused = PackedLinear(linear.weight, linear.bias, amx=AMX, swiglu=True)
    gate_up = torch.nn.functional.linear(x.double(), linear.weight.double(), None if not bias else linear.bias.double())
    exact = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    _assert_rounded_once(fused(x), exact)


@needs_amx
def test_amx_falls_back_to_onednn_where_the_shape_does_not_fit():
    linear = nn.Linear(40, 64).to(torch.bfloat16)  # tiles hold 32 inputs of a row: 40 does not fit
    packed = PackedLinear(linear.weight, linear.bias, amx=AMX)
    assert packed.amx is None
    x = torch.randn(3, 40).to(torch.bfloat16)
    assert torch.equal(packed(x), linear(x))
    with pytest.raises(ValueError, match="swiglu"):
        PackedLinear(linear.weight, amx=AMX, swiglu=True)
    with pytest.raises(ValueError, match="swiglu"):
        PackedLinear(torch.randn(48, 64).to(torch.bfloat16), amx=AMX, swiglu=True)  # 48 = 2 x 24: no 16-wide halves


@needs_amx
def test_cpp_bf16_engine_runs_amx_linears_with_fused_swiglu(tiny_llama_dir):
    engine = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, dtype="bfloat16",
                    kernel_backend="cpp")
    model = engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * model.config.num_layers + 1 and all(m.amx is not None for m in linears)
    assert all(layer.mlp.gate_up_proj.swiglu for layer in model.layers)
    torch_backend = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=16, dtype="bfloat16",
                           kernel_backend="torch")
    assert all(m.amx is None for m in torch_backend.runner.model.modules() if isinstance(m, PackedLinear))


@needs_amx
def test_amx_linear_rows_do_not_depend_on_the_batch():
    # Each output row is its own fixed-order sum over K (row tiles never mix), so a row's bits are
    # the same at any batch size: a bf16 engine's linears are batch-invariant, unlike MKL's fp32.
    torch.manual_seed(0)
    packed = PackedLinear(torch.randn(200, 576).to(torch.bfloat16), amx=AMX)
    x = torch.randn(70, 576).to(torch.bfloat16)
    full = packed(x)
    for rows in (slice(0, 1), slice(3, 8), slice(17, 50)):
        assert torch.equal(packed(x[rows]), full[rows])
