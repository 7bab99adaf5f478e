"""bf16 linear layers with their weights prepacked once for oneDNN (CPU).

``F.linear`` on a plain bf16 weight makes oneDNN reorder the whole weight into its AMX/VNNI tile
layout on every call: for a decode step the reorder costs as much as the matmul, because both read
the weight from memory. Packing at load time leaves one read per call. Measured here (2-core
Sapphire Rapids VM, a 3072x576 weight streamed from DRAM): 1.3-1.9x faster from 1 to 512 rows, with
bit-identical results. fp32 gains at some row counts but not at 1 or 512, and its results move by
~1e-4, so fp32 models keep ``nn.Linear``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose bf16 weight lives in oneDNN's packed layout.

    Owns the packed weight (an opaque mkldnn tensor, deliberately not a parameter or buffer, so
    ``state_dict`` and ``.to()`` never see it) and the bias. Takes and returns bf16 ``[T, in]`` /
    ``[T, out]``; other inputs (another dtype, more dims) are rejected rather than silently slowed.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach()
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"PackedLinear takes a 2-D bf16 CPU weight, got {weight.dtype} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.weight_nbytes = weight.numel() * weight.element_size()
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear expects bf16 [T, {self.in_features}], got {x.dtype} {tuple(x.shape)}")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packing_supported() -> bool:
    """oneDNN is built in and this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_bf16_linears(model: nn.Module) -> int:
    """Swap every bf16 ``nn.Linear`` of ``model`` (CPU) for a PackedLinear; returns how many.

    Returns 0 and changes nothing when this CPU or torch build cannot pack.
    """
    if not packing_supported():
        return 0
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16 and mod.weight.device.type == "cpu"]
    try:
        packed = [(name, PackedLinear(mod.weight, mod.bias)) for name, mod in targets]
    except RuntimeError as e:  # a oneDNN build that refuses the reorder: keep the plain layers
        log.warning("bf16 weight prepacking unavailable, keeping nn.Linear (%s)", e)
        return 0
    for name, new in packed:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(packed)

