"""Engine settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Everything that shapes one Engine. Validated on construction; field names follow vLLM's.

    ``model`` is a Hugging Face folder, a GGUF file, or None for the bundled default model.
    The KV pool is ``num_kv_blocks`` blocks if given, else as many as fit in ``kv_cache_memory_bytes``.
    ``max_model_len`` None means the model's own context length. ``quantization`` ("int8" or
    "int4") quantizes the linear layers' weights at load time (GGUF Q8_0 / Q4_0 / Q4_1 tensors load
    straight into those formats); a checkpoint written by ``kubeinfer quantize`` is detected by itself.
    ``compile`` runs decode-only steps through ``torch.compile`` (one dynamic-shape graph, built on
    the first decode step, tens of seconds on a small CPU): it fuses the many small ops of a decode
    step, whose per-op overhead dominates at small batches.
    """

    model: str | None = None
    dtype: str = "float32"
    quantization: str | None = None
    quantization_group_size: int | None = None
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int = 1 << 30
    num_kv_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = None
    compile: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.quantization is not None:
            from kubeinfer.worker.quant import get_scheme
            get_scheme(self.quantization, self.quantization_group_size)  # ValueError naming the problem
        elif self.quantization_group_size is not None:
            raise ValueError("quantization_group_size needs quantization='int4'")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model dtype) or 'int8', got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "torch", "cpp", "triton"):
            raise ValueError(f"attention_backend must be auto, torch, cpp or triton, got {self.attention_backend!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
