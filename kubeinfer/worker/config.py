"""Engine settings."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kubeinfer.worker.kv_sizing import DTYPE_BYTES, KV_CACHE_DTYPES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(_DTYPES) == set(DTYPE_BYTES)
KERNEL_BACKENDS = ("auto", "torch", "cpp", "triton")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# The CPU's KV pool when no size is given (on CUDA the pool is sized from the free memory instead).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class EngineConfig:
    """Everything that shapes one Engine. Validated on construction; field names follow vLLM's.

    ``model`` is a Hugging Face folder, a GGUF file, or None for the bundled default model.
    ``device`` is ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``;
    asking for CUDA where there is none fails when the engine starts, not here.
    ``kernel_backend`` chooses the kernels of every layer (attention, norms, rotary, activations,
    quantized and packed linears, the greedy argmax), once, when the model is built: ``auto`` picks
    the fastest that runs the (device, dtype, weight scheme, KV dtype) combination; ``torch`` is the
    reference path on any device; ``cpp`` the C++ CPU kernels; ``triton`` the Triton kernels (CUDA,
    or Triton's interpreter on a CPU when TRITON_INTERPRET=1).
    The KV pool is ``num_kv_blocks`` blocks if given, else as many as fit in ``kv_cache_memory_bytes``;
    when that is None too, 1 GiB on a CPU, and on CUDA ``gpu_memory_utilization`` of the device's
    memory less the weights and a profiled forward pass's activation peak (vLLM's rule).
    ``max_model_len`` None means the model's own context length. ``quantization`` ("int8" or
    "int4") quantizes the linear layers' weights at load time (GGUF Q8_0 / Q4_0 / Q4_1 tensors load
    straight into those formats); a checkpoint written by ``kubeinfer quantize`` is detected by itself.
    ``enforce_eager`` turns off CUDA graphs for decode steps. ``compile`` runs decode-only steps
    through ``torch.compile`` (one dynamic-shape graph, built on the first decode step, tens of
    seconds on a small CPU): it fuses the many small ops of a decode step.
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    quantization: str | None = None
    quantization_group_size: int | None = None
    kv_cache_dtype: str = "auto"
    kernel_backend: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = None
    enforce_eager: bool = False
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None:
            from kubeinfer.worker.quant import get_scheme
            get_scheme(self.quantization, self.quantization_group_size)  # ValueError naming the problem
        elif self.quantization_group_size is not None:
            raise ValueError("quantization_group_size needs quantization='int4'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model dtype) or 'int8', got {self.kv_cache_dtype!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernel_backend!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "num_kv_blocks", "num_threads", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def resolve_device(self) -> torch.device:
        """The device this engine runs on; ValueError (one readable line) when it is not there."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} was asked for, but this machine has no CUDA device "
                                 f"that torch {torch.__version__} can use (torch.cuda.is_available() is False); "
                                 "run it on the CPU (device cpu or auto) or where a GPU is")
            index = device.index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA "
                                 f"device(s), numbered from 0")
            return torch.device("cuda", index)
        return device
