"""dtype "auto" (issue 13, "the fastest correct default"): the rule as a pure function, what real
engines resolve it to from real checkpoints, and what the operator's capacity check counts for it."""

from __future__ import annotations

import logging

import pytest
import torch

from kubeinfer.operator.capacity import estimate_capacity, planned_dtype
from kubeinfer.operator.spec import parse_spec
from kubeinfer.worker import Engine, EngineConfig
from kubeinfer.worker.auto_dtype import checkpoint_float_dtype, choose_dtype, cpu_runs_bf16_natively
from tests.conftest import build_tiny_model

CASES = [  # (device, checkpoint, quantized, cpu bf16, cuda bf16) -> dtype
    (("cuda", "float32", False, False, True), "bfloat16"),
    (("cuda", "bfloat16", True, False, True), "bfloat16"),
    (("cuda", None, False, False, False), "float16"),
    (("cpu", "float32", False, True, False), "float32"),
    (("cpu", "bfloat16", False, True, False), "bfloat16"),
    (("cpu", None, False, True, False), "bfloat16"),       # a GGUF, dequantized
    (("cpu", "bfloat16", False, False, False), "float32"),  # an avx2 CPU widens bf16 in software
    (("cpu", None, True, True, False), "float32"),          # int8/int4 kernels take fp32 activations
    (("cpu", "float16", True, False, False), "float32"),
]


@pytest.mark.parametrize("facts,expected", CASES)
def test_the_rule(facts, expected):
    device, checkpoint, quantized, cpu_bf16, cuda_bf16 = facts
    dtype, why = choose_dtype("auto", device_type=device, checkpoint_dtype=checkpoint, quantized=quantized,
                              cpu_native_bf16=cpu_bf16, cuda_bf16=cuda_bf16)
    assert dtype == expected and why
    assert choose_dtype("float16", device_type=device, checkpoint_dtype=checkpoint, quantized=quantized,
                        cpu_native_bf16=cpu_bf16, cuda_bf16=cuda_bf16) == ("float16", "set by the user")


def test_auto_is_the_default_and_must_be_resolved():
    config = EngineConfig()
    assert config.dtype == "auto"
    with pytest.raises(ValueError, match="resolved when the engine starts"):
        config.torch_dtype
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        EngineConfig(dtype="fp8")


def test_a_float32_checkpoint_stays_float32(tiny_llama_dir, caplog):
    assert checkpoint_float_dtype(tiny_llama_dir) == "float32"
    with caplog.at_level(logging.INFO, logger="kubeinfer.worker.auto_dtype"):
        engine = Engine(model=tiny_llama_dir, max_model_len=64, num_kv_blocks=8)
    assert engine.config.dtype == "float32"
    assert next(engine.runner.model.parameters()).dtype == torch.float32
    assert "dtype float32 (auto: the checkpoint is float32)" in caplog.text  # logged once, with the reason


def test_a_bf16_checkpoint_runs_bf16_where_the_cpu_has_native_bf16(tmp_path):
    path = str(tmp_path / "bf16")
    model = build_tiny_model(path, "llama")
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    assert checkpoint_float_dtype(path) == "bfloat16"
    engine = Engine(model=path, max_model_len=64, num_kv_blocks=8)
    expected = "bfloat16" if cpu_runs_bf16_natively() else "float32"
    assert engine.config.dtype == expected
    assert next(engine.runner.model.parameters()).dtype == getattr(torch, expected)
    quantized = Engine(model=path, max_model_len=64, num_kv_blocks=8, quantization="int8")
    assert quantized.config.dtype == "float32"
    assert Engine(model=path, max_model_len=64, num_kv_blocks=8, dtype="float32").config.dtype == "float32"


def test_the_capacity_check_counts_auto_as_the_most_it_can_pick():
    def body(spec):
        return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "d", "namespace": "ml", "uid": "u", "generation": 1}, "spec": spec}
    cpu = parse_spec(body({}))
    gpu = parse_spec(body({"resources": {"gpus": 1, "gpuMemory": "16Gi"}}))
    assert planned_dtype(cpu) == "float32" and planned_dtype(gpu) == "bfloat16"
    assert planned_dtype(parse_spec(body({"engine": {"dtype": "float16"}}))) == "float16"
    # the builtin model: 134,515,008 parameters
    assert estimate_capacity(cpu).weight_bytes == 134_515_008 * 4
    assert estimate_capacity(gpu).weight_bytes == 134_515_008 * 2
