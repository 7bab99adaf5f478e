"""The C++ CPU kernels' interleaved weight layouts (kernels/int8_gemm.cpp, kernels/q4_gemm.cpp): packed
once at load from a scheme's canonical state (quant.py), and unpacked back to it exactly.

Output rows go in groups of ``KERNEL_GROUP_ROWS``, the last padded with zero rows; per group, each
block of 32 inputs is stored ``[j][row][t]`` (input ``k = 32 b + 4 j + t``), so four activation bytes
broadcast to every lane meet the same four inputs of all the group's rows. Scales (and int4 mins)
are interleaved the same way: the group's rows side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kubeinfer.worker.quant import pack_int4, unpack_int4

KERNEL_GROUP_ROWS = 16
_PACK_GROUPS = 64  # groups packed per step: bounds the temporaries of a large matrix (an LM head)


def _padded_groups(n: int, width: int, dtype: torch.dtype, rows_of: Callable[[int, int], torch.Tensor]
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first group, [groups, KERNEL_GROUP_ROWS, width])`` chunks of the ``n`` rows that
    ``rows_of(r0, r1)`` gives (``[r1 - r0, <= width]``), zero-padded to whole groups and to ``width``."""
    g = KERNEL_GROUP_ROWS
    for r0 in range(0, n, _PACK_GROUPS * g):
        chunk = rows_of(r0, min(n, r0 + _PACK_GROUPS * g))
        padded = torch.zeros(-(-chunk.shape[0] // g) * g, width, dtype=dtype)
        padded[:chunk.shape[0], :chunk.shape[1]] = chunk
        yield r0 // g, padded.view(-1, g, width)


def _interleave(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row values ``[N, C]`` -> ``[N16, C, 16]``: each group's rows side by side."""
    g = KERNEL_GROUP_ROWS
    padded = torch.zeros(-(-t.shape[0] // g) * g, t.shape[1], dtype=dtype)
    padded[:t.shape[0]] = t
    return padded.view(-1, g, t.shape[1]).transpose(1, 2).contiguous()


def _deinterleave(t: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n].to(dtype)


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical int8 state (``qweight [N, K]``, fp32 ``scales [N]``) -> ``qs [N16, KB * 512]`` (K padded
    with zeros to KB blocks of 32) and ``scales [N16, 16]``."""
    n, k = qweight.shape
    kb = -(-k // 32)
    qs = torch.empty(-(-n // KERNEL_GROUP_ROWS), kb * 512, dtype=torch.int8)
    for g0, q in _padded_groups(n, kb * 32, torch.int8, lambda r0, r1: qweight[r0:r1]):
        # [group, row, block, j, t] -> [group, block, j, row, t]
        qs[g0:g0 + q.shape[0]] = q.view(q.shape[0], KERNEL_GROUP_ROWS, kb, 8, 4).permute(0, 2, 3, 1, 4) \
            .reshape(q.shape[0], kb * 512)
    return qs, _interleave(scales.float()[:, None], torch.float32).view(qs.shape[0], KERNEL_GROUP_ROWS)


def unpack_int8(qs: torch.Tensor, scales: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_int8``'s inverse: the canonical ``qweight [n, k]`` and ``scales [n]``."""
    groups, kb = qs.shape[0], qs.shape[1] // 512
    q = qs.view(groups, kb, 8, KERNEL_GROUP_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(-1, kb * 32)
    return q[:n, :k].contiguous(), scales.reshape(-1)[:n].clone()


def pack_q4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical int4 state (``quant.pack_int4`` nibbles, even k low; scales and mins ``[N, K / G]``) ->
    ``qs [N16, K * 8]`` (a block's byte holds input k in its low nibble and k + 16 in its high one) and
    scales and mins ``[N16, K / G, 16]`` (fp16 stays fp16, other dtypes widen to fp32 exactly)."""
    n, half = qweight.shape
    if half % 16:
        raise ValueError(f"the Q4 layout needs K % 32 == 0, got K={2 * half}")
    kb = half // 16
    qs = torch.empty(-(-n // KERNEL_GROUP_ROWS), kb * 256, dtype=torch.uint8)
    for g0, q in _padded_groups(n, 2 * half, torch.uint8, lambda r0, r1: unpack_int4(qweight[r0:r1])):
        # [group, row, block, high, j, t] -> [group, block, j, row, t], the high nibble from k + 16.
        q = q.view(q.shape[0], KERNEL_GROUP_ROWS, kb, 2, 4, 4)
        qs[g0:g0 + q.shape[0]] = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4) \
            .reshape(q.shape[0], kb * 256)
    dtype = scales.dtype if scales.dtype in (torch.float16, torch.float32) else torch.float32
    return qs, _interleave(scales, dtype), _interleave(mins, dtype)


def unpack_q4(qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_q4``'s inverse: the canonical state of ``n`` rows, scales and mins in ``dtype``."""
    groups, kb = qs.shape[0], qs.shape[1] // 256
    b = qs.view(groups, kb, 4, KERNEL_GROUP_ROWS, 4)
    q = torch.stack((b & 0xF, b >> 4), dim=2)  # [group, block, high, j, row, t]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(-1, kb * 32)[:n]
    return pack_int4(q), _deinterleave(scales, n, dtype), _deinterleave(mins, n, dtype)
