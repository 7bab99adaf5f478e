"""Engine settings: the one definition of each, from which the command-line flags of every command
are generated (``kubeinfer.cli.add_engine_args``) and to which the ModelDeployment CRD's fields map
(``crd`` metadata; tests/test_settings_consistency.py keeps the CRD and docs/crd.md in step).

torch-free at import (torch is imported where a dtype or device is resolved): the operator, whose
image has no torch, reads these fields, defaults and help texts too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from kubeinfer.worker.kv_sizing import DTYPE_BYTES, KV_CACHE_DTYPES
from kubeinfer.worker.speculative import MAX_SPECULATIVE_TOKENS, SPECULATIVE_METHODS

if TYPE_CHECKING:
    import torch

KERNEL_BACKENDS = ("auto", "torch", "cpp", "triton")
BLOCK_SIZES = (8, 16, 32, 64, 128)
# "none" is accepted wherever a quantization is named (the CRD's default is none); it means None.
QUANTIZATIONS = ("none", "int8", "int4")
DTYPES = ("auto", *DTYPE_BYTES)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# The CPU's KV pool when no size is given (on CUDA the pool is sized from the free memory instead).
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30

# Defaults that differ by use, named here so that no layer spells its own. Every other default is
# EngineConfig's, everywhere.
# - kubeinfer generate / serve / bench / eval cap the context at 4096 tokens, where a library user's
#   None takes the model's own: that can be 128k tokens for a model given with --model, and the
#   engine refuses a max_model_len that one sequence of cannot fit the default 1 GiB CPU KV pool.
COMMAND_LINE_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_model_len": 4096})
# - A ModelDeployment's replica runs in a pod of fixed memory (resources.memory, 4Gi by default), and
#   on a CPU the operator sizes its KV pool for maxModelLen x maxNumSeqs tokens (operator/capacity.py):
#   2048 x 16 for the builtin model is 1.4 GiB of KV, which fits 4Gi beside the weights and runtime;
#   the command line's 4096 x 64 would need 11 GiB.
DEPLOYMENT_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_model_len": 2048, "max_num_seqs": 16})

# EngineConfig fields that no command-line flag sets, and why.
NOT_ON_COMMAND_LINE: Mapping[str, str] = MappingProxyType({
    "seed": "the commands' --seed is already each request's sampling seed (SamplingParams.seed), which wins",
})
# EngineConfig fields that a ModelDeployment does not set, and why (fields with ``crd`` metadata map to
# the CRD; a test fails for a field in neither).
NOT_IN_CRD: Mapping[str, str] = MappingProxyType({
    "device": "follows spec.resources.gpus: cuda with a GPU, cpu without, never detection (spec.to_app_config)",
    "num_threads": "follows spec.resources.cpu (whole cores): torch would count the node's cores, not the pod's",
    "num_kv_blocks": "a device-local override of the pool size; a deployment sizes it with kvCacheMemory",
    "quantization_group_size": "the capacity check sizes int4 weights for the default groups of 32",
    "seed": "not worth a CRD field: a request's own seed gives reproducible samples on any replica",
})


def _setting(default: Any, help: str, *, crd: str | None = None, flag: str | None = None,
             choices: tuple | None = None, metavar: str | None = None, gib: bool = False) -> Any:
    """An EngineConfig field with what the command line and the CRD need to know about it.

    ``help``: the flag's help and the meaning of the field. ``crd``: the field's path under a
    ModelDeployment's ``spec`` (``engine.maxNumSeqs``). ``flag``: the command-line flag when it is not
    ``--`` + the name with dashes (names users already type); a bool that defaults to True gets a
    ``--no-...`` flag. ``gib``: the flag takes GiB (a float), the field bytes."""
    meta = {"help": help, "crd": crd, "flag": flag, "choices": choices, "metavar": metavar, "gib": gib}
    return field(default=default, metadata=MappingProxyType(meta))


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
    "int4"; "none" is None) quantizes the linear layers' weights at load time (GGUF Q8_0 / Q4_0 / Q4_1
    tensors load straight into those formats); a checkpoint written by ``kubeinfer quantize`` is
    detected by itself. ``enforce_eager`` turns off CUDA graphs for decode steps. ``compile`` runs
    decode-only steps through ``torch.compile`` (one dynamic-shape graph, built on the first decode
    step, tens of seconds on a small CPU): it fuses the many small ops of a decode step.
    Each field's ``metadata["help"]`` is its one-line description (the flags' help).
    """

    model: str | None = _setting(
        None, "Hugging Face folder or GGUF file (default: the bundled SmolLM2-135M-Instruct)", crd="model.uri")
    device: str = _setting(
        "auto", "where the engine runs: auto is the first CUDA GPU when torch sees one, else the CPU",
        metavar="{auto,cpu,cuda,cuda:N}")
    dtype: str = _setting(
        "auto", "activations and unquantized weights; auto picks the fastest correct one when the engine starts "
        "(bfloat16 on a GPU; on a CPU float32 for a float32 checkpoint or int8/int4 weights, else bfloat16 where "
        "the CPU has native bf16) and logs it",
        crd="engine.dtype", choices=DTYPES)
    quantization: str | None = _setting(
        None, "weight-only quantization of the linear layers at load time (GGUF Q8_0/Q4_x load directly)",
        crd="model.quantization", choices=QUANTIZATIONS)
    quantization_group_size: int | None = _setting(
        None, "int4 group size: 32, 64 or 128 (default 32)", flag="--group-size")
    kv_cache_dtype: str = _setting(
        "auto", "KV-cache element type: auto (the model dtype) or int8 (plus an fp32 scale per token and head)",
        crd="engine.kvCacheDtype", choices=KV_CACHE_DTYPES)
    kernel_backend: str = _setting(
        "auto", "the kernels of every layer: auto picks the fastest for the device and dtype; torch is the "
        "reference path", crd="engine.kernelBackend", choices=KERNEL_BACKENDS)
    max_model_len: int | None = _setting(
        None, "longest sequence (prompt + generated tokens); None (EngineConfig's default) is the model's own "
        "context length",
        crd="model.maxModelLen")
    block_size: int = _setting(
        16, "tokens per paged KV-cache block", crd="engine.kvBlockSize", choices=BLOCK_SIZES)
    kv_cache_memory_bytes: int | None = _setting(
        None, "memory for the paged KV cache (default: 1 GiB on a CPU; on a GPU, what --gpu-memory-utilization "
        "leaves after the weights and activations)", crd="engine.kvCacheMemory", flag="--kv-cache-memory-gb",
        gib=True)
    gpu_memory_utilization: float = _setting(
        0.9, "on a GPU: the fraction of its memory the engine may use for weights, activations and the KV cache",
        crd="engine.gpuMemoryUtilization")
    num_kv_blocks: int | None = _setting(
        None, "KV-cache blocks, overriding --kv-cache-memory-gb (default: as many as fit in that memory)")
    max_num_seqs: int = _setting(64, "most sequences batched in one engine step", crd="engine.maxNumSeqs")
    max_num_batched_tokens: int = _setting(
        512, "most tokens (prefill chunks plus decodes) in one engine step", crd="engine.maxNumBatchedTokens")
    enable_prefix_caching: bool = _setting(
        True, "reuse the KV blocks of prompt prefixes shared between requests", crd="engine.prefixCaching",
        flag="--no-prefix-caching")
    enable_chunked_prefill: bool = _setting(
        True, "split long prompts across steps (when off, max_num_batched_tokens must hold the longest prompt)",
        crd="engine.chunkedPrefill", flag="--no-chunked-prefill")
    num_threads: int | None = _setting(
        None, "torch intra-op threads (default on a CPU: the CPUs this process may use, capped by its cgroup's CPU "
        "quota; worker/cpu_budget.py)", flag="--threads")
    enforce_eager: bool = _setting(
        False, "on a GPU: run every step eagerly, no CUDA graphs for decode steps", crd="engine.enforceEager")
    compile: bool = _setting(
        False, "torch.compile decode steps (faster decode; the first step compiles for tens of seconds)",
        crd="engine.compile")
    speculative_method: str | None = _setting(
        None, "speculative decoding, verified in one step and exact (greedy output is unchanged): ngram proposes "
        "the tokens that followed the latest earlier match of the last few tokens (prompt lookup); draft runs a "
        "draft model (by default the target itself at int4)",
        crd="engine.speculative.method", choices=SPECULATIVE_METHODS)
    num_speculative_tokens: int = _setting(
        4, f"draft tokens proposed per step when speculating (1 to {MAX_SPECULATIVE_TOKENS})",
        crd="engine.speculative.numSpeculativeTokens")
    prompt_lookup_min: int = _setting(
        2, "ngram speculation: the shortest n-gram matched", crd="engine.speculative.promptLookupMin")
    prompt_lookup_max: int = _setting(
        4, "ngram speculation: the longest n-gram matched (tried first)", crd="engine.speculative.promptLookupMax")
    speculative_draft_model: str | None = _setting(
        None, "speculative_method draft: the draft model's Hugging Face folder or GGUF file, sharing the target's "
        "tokenizer (default: the target's own weights, quantized with --draft-quantization)", flag="--draft-model",
        crd="engine.speculative.draftModel")
    speculative_draft_quantization: str | None = _setting(
        "int4", "speculative_method draft: the draft's weight quantization", flag="--draft-quantization",
        crd="engine.speculative.draftQuantization", choices=QUANTIZATIONS)
    speculative_disable_by_batch_size: int = _setting(
        8, "no speculation in a step with more running sequences than this (a full batch is compute-bound, "
        "where verifying drafts costs more than it saves)", crd="engine.speculative.disableByBatchSize")
    seed: int = _setting(0, "seeds the engine's generator for requests without a seed of their own, so an "
                               "engine's sampling is reproducible from its start (a request's seed wins)")

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if isinstance(self.quantization, str) and self.quantization.strip().lower() == "none":
            self.quantization = None
        if self.quantization is not None:
            from kubeinfer.worker.quant import get_scheme
            get_scheme(self.quantization, self.quantization_group_size)  # ValueError naming the problem
        elif self.quantization_group_size is not None:
            raise ValueError("quantization_group_size needs quantization='int4'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' (the model dtype) or 'int8', got {self.kv_cache_dtype!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {', '.join(KERNEL_BACKENDS)}, got {self.kernel_backend!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.speculative_method, str) and self.speculative_method.strip().lower() == "none":
            self.speculative_method = None
        if isinstance(self.speculative_draft_quantization, str) and \
                self.speculative_draft_quantization.strip().lower() == "none":
            self.speculative_draft_quantization = None
        if self.speculative_draft_quantization not in (None, *QUANTIZATIONS[1:]):
            raise ValueError(f"speculative_draft_quantization must be none, int8 or int4, "
                             f"got {self.speculative_draft_quantization!r}")
        if self.speculative_method is not None and self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                             f"got {self.speculative_method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "speculative_disable_by_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be <= {MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}")
        if self.prompt_lookup_max < self.prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max ({self.prompt_lookup_max}) must be >= prompt_lookup_min "
                             f"({self.prompt_lookup_min})")
        for name in ("max_model_len", "num_kv_blocks", "num_threads", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 when set, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as torch's; only once ``auto`` is resolved (``Engine.config`` always is)."""
        import torch
        if self.dtype == "auto":
            raise ValueError("dtype 'auto' is resolved when the engine starts (worker/auto_dtype.py)")
        return getattr(torch, self.dtype)

    def resolve_device(self) -> torch.device:
        """The device this engine runs on; ValueError (one readable line) when it is not there."""
        import torch
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
