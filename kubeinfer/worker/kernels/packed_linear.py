"""bf16 linear layers on a CPU with their weights packed once, at load time.

Two packings, the first this machine can run:

- AMX tiles for the C++ kernel (kernels/amx_linear.cpp), where the CPU has AMX and the kernels
  built. A decode step's linears stream every weight once for a few dozen rows; this kernel streams
  each thread's weights as one sequential run and costs a few us per call. Measured here (2-core
  Sapphire Rapids VM, SmolLM2-135M's four layer shapes, weights from DRAM): 1.2-1.4x oneDNN's
  throughput from 1 to 64 rows; at 2048 rows (prefill) it is ~10% slower. A gate|up weight can be
  packed with ``swiglu``: the kernel then returns silu(gate) * up directly.
- oneDNN's packed layout otherwise. ``F.linear`` on a plain bf16 weight makes oneDNN reorder the
  whole weight on every call, as much memory traffic as the matmul; packing once leaves one read
  per call (1.3-1.9x from 1 to 512 rows, bit-identical results).

fp32 weights are left alone: oneDNN packing gave no gain at 1 or 512 rows and moved results ~1e-4.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose bf16 weight lives in a packed layout (AMX tiles or oneDNN's).

    Owns the packed weight (deliberately not a parameter or buffer, so ``state_dict`` and ``.to()``
    never see it) and the bias. Takes bf16 ``[T, in]`` and returns bf16 ``[T, out]``, or with
    ``swiglu`` (AMX only; the weight is gate|up stacked, ``[2I, in]``) ``silu(gate) * up`` ``[T, I]``.
    Other inputs (another dtype, more dims) are rejected rather than silently slowed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 amx: ModuleType | None = None, swiglu: bool = False) -> None:
        super().__init__()
        weight = weight.detach()
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"PackedLinear takes a 2-D bf16 CPU weight, got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        if amx is not None and not amx_fits(weight.shape, swiglu):
            amx = None
        if swiglu and amx is None:
            raise ValueError("swiglu needs the AMX kernel and a gate|up weight with out_features % 32 == 0")
        self.amx, self.swiglu = amx, swiglu
        self.packed = amx.amx_pack_weight(weight, swiglu) if amx is not None else \
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.weight_nbytes = weight.numel() * weight.element_size()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._run = self._amx if amx is not None else self._onednn  # decided once, by the packing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear expects bf16 [T, {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        return self._run(x)

    def _amx(self, x: torch.Tensor) -> torch.Tensor:
        return self.amx.amx_linear(x, self.packed, self.bias, self.out_features, self.swiglu)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        kind = "amx" if self.amx is not None else "onednn"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packing={kind}{', swiglu' if self.swiglu else ''}")


def amx_fits(shape: torch.Size | tuple[int, int], swiglu: bool = False) -> bool:
    """The AMX layout takes in_features % 32 == 0 (tiles hold 32 bf16 of a row), and a gate|up
    weight for swiglu out_features % 32 == 0 (each 32-column panel is 16 gate and 16 up columns)."""
    out_features, in_features = shape
    return in_features % 32 == 0 and (not swiglu or out_features % 32 == 0)


def amx_kernels(kernels: ModuleType | None) -> ModuleType | None:
    """The C++ kernel module when it can run AMX matmuls here (built with AMX, and the OS grants
    this process its tile state), else None."""
    return kernels if kernels is not None and kernels.amx_available() else None


def packing_supported() -> bool:
    """oneDNN is built in and this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_bf16_linears(model: nn.Module, amx: ModuleType | None = None) -> int:
    """Swap every bf16 ``nn.Linear`` of ``model`` (CPU) for a PackedLinear, on ``amx`` (from
    ``amx_kernels``) where given and the shape fits, else oneDNN; returns how many.

    Returns 0 and changes nothing when this CPU or torch build cannot pack.
    """
    if amx is None and not packing_supported():
        return 0
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu"]
    try:
        packed = [(name, PackedLinear(mod.weight, mod.bias, amx=amx)) for name, mod in targets]
    except RuntimeError as e:  # a oneDNN build that refuses the reorder: keep the plain layers
        log.warning("bf16 weight prepacking unavailable, keeping nn.Linear (%s)", e)
        return 0
    for name, new in packed:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(packed)
