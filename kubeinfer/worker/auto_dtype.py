"""What ``dtype="auto"`` (EngineConfig's default) becomes: the fastest correct dtype for the device,
the checkpoint and the weight scheme, decided once when an engine starts, and logged.

The rule (``choose_dtype``; a dtype the user sets is always kept):

- a float32 checkpoint on a CPU stays float32: its author chose full precision, and a CPU runs it
  at full speed with the C++ kernels (transformers' ``torch_dtype="auto"`` keeps it too);
- on CUDA every float checkpoint runs in bfloat16 (float16 where the GPU has no bf16), as vLLM's
  ``auto`` does: a GPU's tensor cores run half precision many times faster than float32;
- on a CPU, int8 / int4 weights run with float32 activations: their C++ kernels take float32 rows
  and a bf16 model's widen them first (docs/benchmarks.md: batch-1 int4 decode is about 1.7x faster
  with float32 activations);
- a half-precision checkpoint (bf16 / fp16 safetensors, a GGUF) on a CPU runs in bfloat16 where our
  kernels' tier has native bf16 dot products (avx512 with AVX512-BF16, amx): half the bytes per
  weight and oneDNN's bf16 GEMMs (when oneDNN runs bf16 natively too: ONEDNN_MAX_CPU_ISA may hold
  it lower); elsewhere (avx2) in float32, where bf16 GEMMs widen in software and run ~10x slower.
"""

from __future__ import annotations

import glob
import logging
import os

log = logging.getLogger(__name__)

AUTO = "auto"
# The tiers of kernels/cpu.py whose CPU flags include native bf16 dot products.
NATIVE_BF16_TIERS = ("avx512", "amx")
_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def choose_dtype(requested: str, *, device_type: str, checkpoint_dtype: str | None, quantized: bool,
                 cpu_native_bf16: bool, cuda_bf16: bool) -> tuple[str, str]:
    """``(dtype, why)`` for an engine: a pure function of the facts, so every case is testable here.

    ``checkpoint_dtype`` is the stored float dtype (None when unknown or not a float format, as for
    a quantized GGUF); ``quantized`` means int8 / int4 linears, asked for or stored."""
    if requested != AUTO:
        return requested, "set by the user"
    if device_type == "cuda":
        if cuda_bf16:
            return "bfloat16", "auto on CUDA: bfloat16 (the GPU supports it)"
        return "float16", "auto on CUDA: float16 (this GPU has no bfloat16)"
    if checkpoint_dtype == "float32":
        return "float32", "auto: the checkpoint is float32"
    if quantized:
        return "float32", "auto on a CPU: int8/int4 kernels take float32 activations"
    if cpu_native_bf16:
        return "bfloat16", f"auto on a CPU with native bf16 ({checkpoint_dtype or 'reduced-precision'} checkpoint)"
    return "float32", "auto on a CPU without native bf16 dot products (bf16 would be widened in software)"


def checkpoint_float_dtype(path: str) -> str | None:
    """The float dtype a checkpoint stores its weights in: the first float tensor of a safetensors
    folder (read from the header, no tensor mapped), ``float32`` for a GGUF whose tensors are all F32,
    else None."""
    if os.path.isdir(path):
        from kubeinfer.worker.quant_checkpoint import read_safetensors_header
        for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            for name, info in read_safetensors_header(file).items():
                if name != "__metadata__" and isinstance(info, dict) and info.get("dtype") in _SAFETENSORS_FLOATS:
                    return _SAFETENSORS_FLOATS[info["dtype"]]
        return None
    from kubeinfer.worker.models import gguf
    from kubeinfer.worker.models.loader import _is_gguf
    if not _is_gguf(path):
        return None  # the loader refuses it with its own message
    reader = gguf.open_gguf(path)
    return "float32" if reader.tensors and all(t.tensor_type == 0 for t in reader.tensors) else None


def cpu_runs_bf16_natively() -> bool:
    """Both our kernels' tier (kernels/cpu.py; KUBEINFER_CPU_ISA may force it lower) and torch's
    oneDNN (ONEDNN_MAX_CPU_ISA may hold it lower) have bf16 dot products on this CPU."""
    from kubeinfer.worker.kernels.cpu import selected_tier
    from kubeinfer.worker.kernels.packed_linear import packing_supported
    return selected_tier() in NATIVE_BF16_TIERS and packing_supported()


def resolve_dtype(config, device, loaded=None) -> str:
    """The concrete dtype an engine with ``config`` runs on ``device`` (a torch.device), logged once.
    ``loaded``: a model built elsewhere, whose own dtype ``auto`` keeps."""
    import torch
    if config.dtype != AUTO:
        return config.dtype
    if loaded is not None:
        dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
        why = "auto: the model handed to the engine is " + dtype
    else:
        from kubeinfer.worker.models.loader import resolve_model_path
        from kubeinfer.worker.quant_checkpoint import quant_scheme_of
        path = resolve_model_path(config.model)
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else []
        quantized = config.quantization is not None or (bool(files) and quant_scheme_of(files[0]) is not None)
        cuda = device.type == "cuda"
        dtype, why = choose_dtype(
            AUTO, device_type=device.type, checkpoint_dtype=checkpoint_float_dtype(path), quantized=quantized,
            cpu_native_bf16=not cuda and cpu_runs_bf16_natively(),
            cuda_bf16=cuda and torch.cuda.is_bf16_supported())
    log.info("dtype %s (%s); set --dtype to choose another", dtype, why)
    return dtype
