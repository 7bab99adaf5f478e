"""Pre-flight capacity check: will one replica's weights, KV cache and runtime fit its memory?

Pure arithmetic on the parsed spec; nothing is loaded. The KV bytes come from
``kubeinfer.worker.kv_sizing``, the formula the engine allocates by (torch-free, so the operator's
image needs no torch). The KV counted is ``spec.engine.kvCacheMemory`` when set, else room for
``maxModelLen x maxNumSeqs`` tokens. On a CPU ``to_app_config`` passes that size to the engine, so
the estimate and the allocation agree; on a GPU the engine sizes its pool from
``gpuMemoryUtilization`` itself, and the check makes sure that share of ``resources.gpuMemory``
holds the weights, those tokens and the overhead. A model whose size the operator cannot know (no
builtin, no hints) gets ``fits=None``: unknown, which must not block deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubeinfer.operator.model_source import ModelDims
from kubeinfer.worker import kv_sizing
from kubeinfer.worker.kv_sizing import DTYPE_BYTES

if TYPE_CHECKING:
    from kubeinfer.operator.spec import ModelDeploymentSpec

GIB = 1 << 30
# Python, torch, Ray's worker process and the engine's activations (on a GPU: the CUDA context and
# the activations): an allowance (not measured per model), on the side of caution.
RUNTIME_OVERHEAD_BYTES = 512 << 20
# int8: one fp32 scale per output row, i.e. 4 / in_features bytes per weight (in_features taken as
# 512 when the model's hidden size is unknown, which over-counts for larger models).
_INT8_SCALE_IN_FEATURES = 512
# int4: 4 bits per weight plus an fp16 scale and an fp16 min per group of 32 (the default group size).
_INT4_BYTES_PER_WEIGHT = 0.5 + 4 / 32


def planned_dtype(spec: ModelDeploymentSpec) -> str:
    """The dtype the capacity check counts: ``engine.dtype`` when set; for ``auto`` the widest that
    auto can pick on the replica's device (worker/auto_dtype.py): half precision on a GPU, float32
    on a CPU (a float32 checkpoint or int8/int4 weights; the node's CPU is not known here)."""
    if spec.engine.dtype != "auto":
        return spec.engine.dtype
    return "bfloat16" if spec.resources.gpus else "float32"


def kv_bytes_per_token(dims: ModelDims, dtype: str, kv_cache_dtype: str) -> int | None:
    """K and V for one token across all layers, by the engine's own formula; None when the model's
    dimensions are unknown."""
    if not dims.knows_kv:
        return None
    return kv_sizing.kv_bytes_per_token(dims.num_layers, dims.num_kv_heads, dims.head_dim, dtype, kv_cache_dtype)


def pool_bytes_per_token(spec: ModelDeploymentSpec) -> int | None:
    """What one token takes in the KV pool: the model's K/V, and with ``speculative.method: draft`` the
    draft's too (the model itself, quantized: same layers and heads), whose K/V share the blocks."""
    per_token = kv_bytes_per_token(spec.model.dims, planned_dtype(spec), spec.engine.kv_cache_dtype)
    if per_token is None or spec.draft_source is not None:  # a draft model of its own: its size is unknown
        return None
    return per_token * (2 if spec.engine.speculative_method == "draft" else 1)


def kv_required_bytes(spec: ModelDeploymentSpec) -> int | None:
    """The KV cache the replica must hold: ``engine.kvCacheMemory`` when set, else ``maxNumSeqs``
    sequences of ``maxModelLen`` tokens in whole blocks; None when neither set nor computable."""
    if spec.engine.kv_cache_memory_bytes is not None:
        return spec.engine.kv_cache_memory_bytes
    per_token = pool_bytes_per_token(spec)
    if per_token is None:
        return None
    return kv_sizing.kv_bytes_for_tokens(spec.model.max_model_len, spec.engine.max_num_seqs, per_token,
                                         spec.engine.block_size)


def kv_pool_bytes(spec: ModelDeploymentSpec) -> int | None:
    """The ``kv_cache_memory_bytes`` to hand the engine; None leaves the engine's own default.

    On a GPU that is None unless ``engine.kvCacheMemory`` is set: the engine then sizes the pool
    from ``gpuMemoryUtilization`` of the device (what is left after the weights and a profiled
    forward pass), which is at least what the capacity check required when it passes. On a CPU
    it is ``kv_required_bytes`` (None when unknown: the engine's 1 GiB)."""
    if spec.resources.gpus and spec.engine.kv_cache_memory_bytes is None:
        return None
    return kv_required_bytes(spec)


def weight_bytes(dims: ModelDims, dtype: str, quantization: str | None) -> int | None:
    """Weights at the chosen quantization: only the layers' linear weights are quantized, the
    ``float_params`` (embedding, norms) stay in ``dtype``."""
    if dims.parameter_count is None:
        return None
    float_bytes = DTYPE_BYTES[dtype]
    linear = max(dims.parameter_count - dims.float_params, 0)
    if quantization == "int8":
        per_weight = 1 + 4 / (dims.hidden_size or _INT8_SCALE_IN_FEATURES)
    elif quantization == "int4":
        per_weight = _INT4_BYTES_PER_WEIGHT
    else:
        per_weight = float_bytes
    return int(linear * per_weight) + dims.float_params * float_bytes


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class CapacityEstimate:
    """The pre-flight verdict for one replica. ``fits`` is True, False, or None (unknown: the model's
    size or the memory to compare with is not known). ``required_bytes`` is weights + KV + overhead
    when both parts are known; ``message`` states the numbers in GiB for a condition or an Event.
    """

    fits: bool | None
    message: str
    weight_bytes: int | None
    kv_bytes: int | None
    overhead_bytes: int
    available_bytes: int | None
    memory_field: str

    @property
    def required_bytes(self) -> int | None:
        if self.weight_bytes is None or self.kv_bytes is None:
            return None
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes


def estimate_capacity(spec: ModelDeploymentSpec) -> CapacityEstimate:
    """Weights + KV + runtime overhead against the replica's memory: ``resources.memory`` on a CPU;
    with a GPU (where weights and the KV pool live) ``gpuMemoryUtilization x resources.gpuMemory``,
    the share the engine lets itself use."""
    res, dims = spec.resources, spec.model.dims
    dtype = planned_dtype(spec)
    weights = weight_bytes(dims, dtype, spec.model.quantization)
    if spec.draft_source is not None:  # a draft model of its own, whose size the operator cannot know
        weights = None
    elif weights is not None and spec.engine.speculative_method == "draft":  # a second, quantized copy
        weights += weight_bytes(dims, dtype, spec.engine.speculative_draft_quantization)
    kv = kv_required_bytes(spec)
    if res.gpus:
        util = spec.engine.gpu_memory_utilization
        field_name = "resources.gpuMemory" if util == 1 else f"{util:g} x resources.gpuMemory"
        available = None if res.gpu_memory_bytes is None else int(res.gpu_memory_bytes * util)
    else:
        field_name, available = "resources.memory", res.memory_bytes
    estimate = dict(weight_bytes=weights, kv_bytes=kv, overhead_bytes=RUNTIME_OVERHEAD_BYTES,
                    available_bytes=available, memory_field=field_name)
    if spec.draft_source is not None:
        return CapacityEstimate(fits=None, message="memory need unknown: the operator cannot size the draft "
                                "model (spec.engine.speculative.draftModel); the replica checks when it starts",
                                **estimate)
    if weights is None or kv is None:
        missing = "spec.model.parameterCount" if weights is None else "spec.model.architecture"
        return CapacityEstimate(fits=None, message=f"memory need unknown: set {missing} to check it", **estimate)
    per_token = pool_bytes_per_token(spec)
    if per_token is not None:
        # The engine refuses to start when one maxModelLen sequence does not fit the pool.
        tokens = kv_sizing.kv_blocks_for_bytes(kv, per_token, spec.engine.block_size) * spec.engine.block_size
        if tokens < spec.model.max_model_len:
            return CapacityEstimate(
                fits=False, message=f"the KV cache ({_gib(kv)}) holds {tokens} tokens, fewer than "
                f"maxModelLen {spec.model.max_model_len}: raise engine.kvCacheMemory or lower maxModelLen",
                **estimate)
    need = weights + kv + RUNTIME_OVERHEAD_BYTES
    drafting = " (the model and its draft)" if spec.engine.speculative_method == "draft" else ""
    parts = (f"weights{drafting} {_gib(weights)} + KV {_gib(kv)} + overhead {_gib(RUNTIME_OVERHEAD_BYTES)}")
    if available is None:
        return CapacityEstimate(fits=None, message=f"needs {_gib(need)} ({parts}); set resources.gpuMemory "
                                "to check it", **estimate)
    if need > available:
        return CapacityEstimate(fits=False, message=f"needs {_gib(need)} ({parts}) but the replica has "
                                f"{_gib(available)} ({field_name})", **estimate)
    return CapacityEstimate(fits=True, message=f"needs {_gib(need)} ({parts}) of {_gib(available)} "
                            f"({field_name})", **estimate)
