"""bf16 linears prepacked for oneDNN (kernels/packed_linear.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from kubeinfer.worker import Engine
from kubeinfer.worker.kernels.packed_linear import PackedLinear, pack_bf16_linears, packing_supported
from kubeinfer.worker.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not packing_supported(), reason="this CPU or torch build has no oneDNN bf16 matmul")


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
