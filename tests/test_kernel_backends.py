"""Which kernels run is decided once, from (device, dtype, weight scheme, KV dtype, this CPU), and an
impossible combination is refused at start with a reason. No GPU is needed: choosing a CUDA backend
touches no device."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from kubeinfer.worker import Engine, EngineConfig
from kubeinfer.worker.kernels import select_backend, triton_support
from kubeinfer.worker.kernels.cpu import load_cpu_kernels

CPP = "cpp" if load_cpu_kernels() is not None else "torch"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("device,dtype,quantization,kv_int8,want", [
    ("cpu", F32, None, False, CPP), ("cpu", BF16, "int4", False, CPP), ("cpu", F32, "int8", False, CPP),
    ("cpu", F16, None, False, "torch"), ("cpu", F32, None, True, "torch"), ("cpu", BF16, "int8", True, "torch"),
    ("cuda", BF16, None, False, "triton"), ("cuda", F16, "int4", True, "triton"), ("cuda", F32, "int8", False, "triton"),
    ("cuda:1", BF16, "int8", True, "triton"),
])
def test_auto_choice(device, dtype, quantization, kv_int8, want):
    backend = select_backend("auto", device, dtype, kv_int8=kv_int8, quantization=quantization)
    assert backend.name == want
    assert backend.device == torch.device(device) and backend.dtype == dtype and backend.kv_int8 == kv_int8


def test_auto_without_triton_falls_back_to_the_torch_reference_on_cuda(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_importable", lambda: False)
    assert select_backend("auto", "cuda", BF16).name == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        select_backend("triton", "cuda", BF16)


def test_compiled_decode_steps_keep_plain_torch_ops():
    backend = select_backend("auto", "cpu", BF16, compile_decode=True)
    assert backend.name == "torch" and not backend.pack_weights


@pytest.mark.parametrize("name,device,dtype,kw,match", [
    ("cpp", "cuda", F32, {}, "CPU only"),
    ("cpp", "cpu", F16, {}, "float32 or bfloat16"),
    ("cpp", "cpu", F32, {"kv_int8": True}, "not int8"),
    ("cpp", "cpu", F32, {"compile_decode": True}, "compile off"),
    ("triton", "cuda", F16, {"compile_decode": True}, "CUDA graphs"),
    ("auto", "cpu", F32, {"quantization": "fp8"}, "quantization 'fp8'"),
    ("tpu", "cpu", F32, {}, "kernel_backend must be one of"),
])
def test_impossible_combinations_are_refused(name, device, dtype, kw, match):
    if name == "cpp" and load_cpu_kernels() is None and "CPU only" not in match:
        pytest.skip("the C++ kernels do not build here: a different refusal applies")
    with pytest.raises(ValueError, match=match):
        select_backend(name, device, dtype, **kw)


def test_triton_on_a_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_support, "triton_interpreted", lambda: False)
    with pytest.raises(ValueError, match="interpreter"):
        select_backend("triton", "cpu", F32)


def test_a_missing_gpu_is_reported_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device") as info:
        Engine(EngineConfig(model="/nonexistent/model", device="cuda"))  # the model path is never read
    assert "\n" not in str(info.value)
    assert EngineConfig(device="auto").resolve_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig(device="gpu")


def _forwards(module) -> list[tuple[str, ast.FunctionDef]]:
    tree = ast.parse(inspect.getsource(module))
    return [(cls.name, fn) for cls in ast.walk(tree) if isinstance(cls, ast.ClassDef)
            for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name == "forward"]


def test_no_forward_asks_where_it_runs():
    """Module forwards of the model and the quantized/packed linears call their bound kernel: none
    reads a device, a backend name or a kernels attribute (the choice was made at build time)."""
    from kubeinfer.worker.kernels import packed_linear, quant_linear
    from kubeinfer.worker.models import llama
    forbidden = {"device", "is_cuda", "kernels", "backend", "amx", "cpu_packed", "type"}
    found = []
    for module in (llama, quant_linear, packed_linear):
        forwards = _forwards(module)
        assert forwards, module
        for cls, fn in forwards:
            names = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
            names |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            strings = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
            bad = (names & forbidden) | (strings & {"cpu", "cuda", "torch", "cpp", "triton"})
            if bad:
                found.append(f"{module.__name__}.{cls}.forward: {sorted(bad)}")
    assert not found, found
