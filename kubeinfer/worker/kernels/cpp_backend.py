"""The C++ CPU backend: the kernels of cpu_kernels.cpp, paged_attention.cpp and amx_linear.cpp."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kubeinfer.worker.kernels.attention import AttentionMetadata, LayerKVCache, prefill_attention
from kubeinfer.worker.kernels.backend import StepInputs
from kubeinfer.worker.kernels.cpu import load_cpu_kernels
from kubeinfer.worker.kernels.quant_linear import BoundDecode
from kubeinfer.worker.kernels.torch_backend import TorchBackend


# Above this context the AVX2 build's prefill attention loses to SDPA, whose GEMMs gain with the chunk's
# length (0.98-1.04x at 1024 tokens, 0.84-0.92x at 2048; docs/benchmarks.md, "CPU, part 7"): a step
# with a longer prefill keeps SDPA at that tier. The AVX-512 build wins at every length measured.
AVX2_PREFILL_KERNEL_MAX_CONTEXT = 768


class CppBackend(TorchBackend):
    """fp32 or bf16 models on a CPU with a float KV cache (select_backend checks it).

    At batch 1 a decode step's tensors are a few KB, so each torch op costs its dispatch, not its
    arithmetic; these kernels fold each op into one call. The norm, rotary, SwiGLU, K/V-write and
    decode-attention kernels are the compiled functions themselves (no Python between the module and
    the kernel). Prefill chunks take the C++ prefill attention where the build has it for the model's
    head_dim (decided in ``prepare_model``), else SDPA. Quantized linears take the C++ int8 / int4 kernels (bf16
    activations widened to fp32 around them). bf16 linears are packed into AMX tiles where
    the CPU has AMX (gate|up fused with its SwiGLU), else oneDNN's layout. fp32 linears (and a tied
    head, sharing the embedding's storage) become ``CppF32Linear``: the C++ GEMV for decode-sized
    inputs, ``F.linear`` for prefill-sized ones.
    """

    name = "cpp"

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 kv_int8: bool = False) -> None:
        super().__init__(device, dtype, kv_int8)
        kernels = load_cpu_kernels()
        if kernels is None:
            raise ValueError("the C++ CPU kernels could not be built here (see the log)")
        self.kernels = kernels
        self.rms_norm = kernels.rms_norm
        self.add_rms_norm_ = kernels.add_rms_norm_
        self.rotary_ = kernels.rotary_
        self.silu_mul = kernels.silu_mul
        self.greedy_argmax = kernels.greedy_argmax
        self.sample_rows = kernels.sample_rows
        self._write_kv = kernels.write_kv
        self._decode = kernels.decode_attention
        self._prefill = None  # kernels.prefill_attention, once prepare_model has seen the head_dim
        self._prefill_max_context = AVX2_PREFILL_KERNEL_MAX_CONTEXT if kernels.tier == "avx2" else None

    def quantized_linear(self, scheme, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None) -> nn.Module:
        from kubeinfer.worker.kernels import quant_linear as ql
        # bf16 activations too: widened around each call, these kernels beat aten's int8 and int4
        # ones (docs/benchmarks.md, "CPU kernels, part 4").
        if scheme.name == "int8":
            return ql.CppInt8Linear(state["qweight"], state["scales"], bias, kernels=self.kernels)
        return ql.CppInt4Linear(state["qweight"], state["scales"], state["mins"], scheme.group_size, bias,
                                kernels=self.kernels)

    def prepare_model(self, model: nn.Module) -> None:
        if self.kernels.prefill_attention_supports(model.config.head_dim):
            self._prefill = self.kernels.prefill_attention
        if self.dtype == torch.bfloat16:
            model.pack_bf16_weights(self.kernels)
        elif self.dtype == torch.float32:
            use_f32_gemv(model, self.kernels)

    def decode_stack(self, model: nn.Module):
        from kubeinfer.worker.kernels.decode_stack import build_decode_stack
        return build_decode_stack(model, self.kernels) if self.dtype == torch.float32 else None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self._write_kv(k, v, cache.k, cache.v, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if not meta.prefills:
            return self._decode(q, cache.k, cache.v, meta.decode_block_tables, meta.decode_context_lens, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], cache.k, cache.v, meta.decode_block_tables,
                                    meta.decode_context_lens, scale)
        if meta.cu_seqlens_q is not None:  # the step's chunks go to the prefill kernel
            self._prefill(q, cache.k, cache.v, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, nd, scale, out)
        else:
            prefill_attention(q, k, v, cache, meta, scale, out)
        return out

    def attention_metadata(self, step: StepInputs, kv_caches: list[LayerKVCache]) -> AttentionMetadata:
        # The kernels read the cache through the block tables themselves: no masks, no gather buffers.
        # The prefill kernel takes the step as the Triton path does (every row a chunk's query; a
        # decode is a chunk of one), in int64 on the host.
        kernel = self._prefill is not None and bool(step.prefills) and (
            self._prefill_max_context is None
            or max(ctx for *_, ctx, _ in step.prefills) <= self._prefill_max_context)
        meta = self._common_metadata(step, masks=not kernel)
        if not meta.prefills:
            return meta
        if kernel:
            meta.block_tables, meta.context_lens, meta.cu_seqlens_q = step.query_chunks(torch.long)
            return meta
        gathered = max([0] + [c.block_table.numel() for c in meta.prefills if c.mask is not None])
        if gathered:
            meta.key_workspace, meta.value_workspace = self._workspace(kv_caches[0].k, gathered)
        return meta


# Below this many rows the fp32 GEMV (weights streamed once, at memory speed) beats F.linear; from it on
# oneDNN's GEMM, which reuses each weight for many rows from its caches, wins.
F32_GEMV_MAX_ROWS = 8


class CppF32Linear(BoundDecode, nn.Linear):
    """An fp32 ``nn.Linear`` (the same weight and bias parameters, no copy) whose decode-sized calls
    (fewer than ``F32_GEMV_MAX_ROWS`` rows) run the C++ ``f32_gemv``: at batch 1 ``F.linear`` read the
    weights at about a third of the machine's bandwidth."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, kernels) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self._gemv = kernels.f32_gemv
        self._bind_decode()

    def _bind_decode(self) -> None:
        # The parameters bound once (nn.Module.__getattr__ per call costs microseconds, ~120 calls a
        # step); rebound by _apply, which may swap them.
        gemv, weight, bias = self._gemv, self.weight, self.bias
        self._decode = (lambda x: gemv(x, weight)) if bias is None else (lambda x: gemv(x, weight).add_(bias))

    decode_max_rows = F32_GEMV_MAX_ROWS

    def decode_linear(self, kernels):
        """The decode kernel and its operands for kernels/decode_stack.py (below ``decode_max_rows`` rows)."""
        return kernels.DecodeLinear.f32(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] < F32_GEMV_MAX_ROWS:
            return self._decode(x.contiguous())
        return F.linear(x, self.weight, self.bias)


def use_f32_gemv(model: nn.Module, kernels) -> int:
    """Swap every fp32 CPU ``nn.Linear`` of ``model`` for a ``CppF32Linear`` on the same parameters, and
    give a tied model (no head, no quantized head) a ``CppF32Linear`` head on the embedding's weight
    (shared: lookups keep using it). Returns how many linears now run the GEMV."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu"
               and mod.weight.is_contiguous()]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                CppF32Linear(mod.weight, mod.bias, kernels=kernels))
    swapped = len(targets)
    embed = getattr(model, "embed_tokens", None)
    if (getattr(model, "lm_head", False) is None and getattr(model, "quantized_head", None) is None
            and embed is not None and embed.weight.dtype == torch.float32 and embed.weight.is_contiguous()):
        model.lm_head = CppF32Linear(embed.weight, None, kernels=kernels)
        swapped += 1
    return swapped
