"""Compute kernels, owned per device family by a backend chosen once when the model is built
(kernels/backend.py): a torch reference path, C++ CPU kernels, Triton kernels for CUDA."""

from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache
from kubeinfer.worker.kernels.backend import KernelBackend, StepInputs, select_backend

__all__ = ["AttentionMetadata", "KernelBackend", "LayerKVCache", "StepInputs", "select_backend"]
