"""The operator's KV estimate and the engine's allocation agree, for several models and dtypes.

The operator (no torch, no weights) sizes the KV pool from a ModelDeployment's architecture hints;
the engine allocates from the checkpoint. Both use kubeinfer.worker.kv_sizing. Here real engines are
built from the operator's own rendered settings for real tiny checkpoints, and their pools are
measured: the bytes they claim, the blocks they hand out, and the tensors they hold.
"""

from __future__ import annotations

import json
import os

import pytest

from kubeinfer.operator import capacity
from kubeinfer.operator.spec import parse_spec, to_app_config
from kubeinfer.worker import Engine, EngineConfig
from kubeinfer.worker import kv_sizing
from tests.conftest import TINY_VOCAB, write_tokenizer

MAX_MODEL_LEN = 100  # not a multiple of the block size: a sequence's last block is partly used
MAX_NUM_SEQS = 3


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory) -> str:
    """A third shape: three layers of plain multi-head attention (kv heads = heads), head_dim 32."""
    import torch
    import transformers
    path = str(tmp_path_factory.mktemp("tiny-mha"))
    config = transformers.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=96, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_VOCAB)
    return path


@pytest.fixture(scope="module", params=["llama", "qwen2", "mha"])
def model_dir(request, tiny_llama_dir, tiny_qwen_dir, mha_dir) -> str:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen_dir, "mha": mha_dir}[request.param]


def architecture(path: str) -> dict:
    """The ModelDeployment hints a user would copy from the checkpoint's config.json."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    return {"numLayers": hf["num_hidden_layers"], "numKvHeads": hf["num_key_value_heads"],
            "headDim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]}


def deployment(path: str, dtype: str, kv_cache_dtype: str, block: int = 16) -> dict:
    return {"metadata": {"name": "sized", "namespace": "ml"}, "spec": {
        "model": {"uri": f"file://{path}", "maxModelLen": MAX_MODEL_LEN, "architecture": architecture(path)},
        "engine": {"dtype": dtype, "kvCacheDtype": kv_cache_dtype, "maxNumSeqs": MAX_NUM_SEQS,
                   "kvBlockSize": block}}}


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_operators_pool_is_what_the_engine_allocates(model_dir, dtype, kv_cache_dtype):
    spec = parse_spec(deployment(model_dir, dtype, kv_cache_dtype))
    pool = capacity.kv_pool_bytes(spec)
    per_token = capacity.kv_bytes_per_token(spec.model.dims, dtype, kv_cache_dtype)
    assert pool == capacity.estimate_capacity(spec).kv_bytes

    # The engine as the operator configures it (a CPU replica), on the reference kernels for speed.
    # num_threads is dropped: the engine would set it process-wide, for every later test too.
    kwargs = to_app_config(spec).models[0].replica_engine_kwargs()
    assert (kwargs["device"], kwargs["kv_cache_memory_bytes"]) == ("cpu", pool)
    kwargs.pop("num_threads")
    engine = Engine(EngineConfig(**{**kwargs, "kernel_backend": "torch"}))
    mc = engine.model_config
    assert (mc.num_layers, mc.num_kv_heads, mc.head_dim) == (
        spec.model.dims.num_layers, spec.model.dims.num_kv_heads, spec.model.dims.head_dim)
    blocks_per_seq = -(-MAX_MODEL_LEN // 16)
    assert engine.kv_cache_bytes == pool
    assert engine.num_kv_blocks == MAX_NUM_SEQS * blocks_per_seq  # enough for every full sequence
    assert engine.kv_cache_bytes == engine.num_kv_blocks * 16 * per_token
    # What the engine claims is what its tensors hold: K and V (and int8's scales) of every layer.
    held = sum(t.nbytes for layer in engine.runner.kv_caches for t in layer if t is not None)
    assert held == engine.kv_cache_bytes


def test_per_token_bytes_in_numbers():
    """Two hand-computed cases, so that a formula changed on both sides at once still shows."""
    # SmolLM2-135M: 30 layers x 3 kv heads x 64, K and V, fp32.
    assert kv_sizing.kv_bytes_per_token(30, 3, 64, "float32") == 2 * 30 * 3 * 64 * 4 == 46080
    # int8: one byte per element plus one fp32 scale per (token, kv head), whatever the model dtype.
    assert kv_sizing.kv_bytes_per_token(30, 3, 64, "bfloat16", "int8") == 2 * 30 * 3 * (64 + 4) == 12240
    # 100 tokens in blocks of 16 take 7 blocks each.
    assert kv_sizing.kv_bytes_for_tokens(100, 3, 10, 16) == 7 * 16 * 10 * 3
    assert kv_sizing.kv_blocks_for_bytes(7 * 16 * 10 * 3 + 159, 10, 16) == 21


def test_block_size_rounds_each_sequence_up_to_whole_blocks(tiny_llama_dir):
    for block in (8, 32, 128):
        spec = parse_spec(deployment(tiny_llama_dir, "float32", "auto", block))
        per_token = capacity.kv_bytes_per_token(spec.model.dims, "float32", "auto")
        assert capacity.kv_pool_bytes(spec) == -(-MAX_MODEL_LEN // block) * block * per_token * MAX_NUM_SEQS
