"""Transparent huge pages for the big CPU tensors: the weights and the paged KV pool.

A decode step streams every weight once; with 4 KB pages that is a TLB miss every 4 KB (100 MB of
int4 weights: 25,000 pages against a second-level TLB of a few thousand entries). Kubernetes nodes
mostly run THP in ``madvise`` mode (huge pages only where a program asks), so the engine asks:
``madvise(MADV_HUGEPAGE)`` on memory that no page of has been touched yet, so the faults that fill
it take huge pages at once. Most weight tensors of a small model are far below 2 MB (an int4
SmolLM2 layer's largest is 0.9 MB), so the weights are copied into a few large arenas, in model
order, instead of being advised one by one. Where THP is ``never`` or the call fails, nothing
changes but the copy. What it gains, and that the gain is the pages rather than the arenas'
contiguity: docs/benchmarks.md, "CPU tiers, part 3".
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20
ARENA_BYTES = 256 << 20  # per arena: the load's extra memory is at most one arena's worth, briefly
MIN_TENSOR_BYTES = 64 << 10  # smaller tensors (norm weights, biases) stay where they are
ALIGN = 64
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """``always``, ``madvise`` or ``never`` (the bracketed word of the sysfs file); None off Linux."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def advise(t: torch.Tensor) -> int:
    """``madvise(MADV_HUGEPAGE)`` on the whole 2 MiB pages inside ``t``'s bytes; the bytes advised (0
    when none, or when the call failed)."""
    if _LIBC is None or t.device.type != "cpu" or t.numel() == 0:
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if hi <= lo:
        return 0
    if _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_HUGEPAGE) != 0:
        return 0
    return hi - lo


def huge_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros`` on the CPU, advised before its pages are touched."""
    t = torch.empty(shape, dtype=dtype)
    advise(t)
    return t.zero_()


def _movable(model: nn.Module) -> list[torch.Tensor]:
    """The model's large contiguous CPU tensors that alone own their storage (a view, or two tensors
    sharing one storage, stays put: moving one would split them)."""
    tensors: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        tensors.setdefault(id(t), t)
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors.values():
        if t.device.type == "cpu" and t.numel():
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    out = []
    for group in by_storage.values():
        t = group[0]
        nbytes = t.numel() * t.element_size()
        if (len(group) == 1 and nbytes >= MIN_TENSOR_BYTES and t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == nbytes):
            out.append(t)
    return out


def move_weights_to_huge_pages(model: nn.Module) -> int:
    """Copy the model's large weights into advised arenas (``t.data`` is swapped, so every module
    holding a tensor keeps it); returns the bytes moved. Run before anything takes aliases of the
    weights (``bind``'s decode stack does)."""
    if thp_mode() not in ("madvise", "always") or _LIBC is None:
        return 0
    pending = _movable(model)
    moved = 0
    while pending:
        batch, size = [], 0
        while pending and (not batch or size + pending[0].numel() * pending[0].element_size() <= ARENA_BYTES):
            t = pending.pop(0)
            batch.append(t)
            size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        arena = torch.empty(size + HUGE_PAGE, dtype=torch.uint8)
        offset = (-arena.data_ptr()) % HUGE_PAGE  # huge pages start at 2 MiB boundaries
        advise(arena)
        for t in batch:
            nbytes = t.numel() * t.element_size()
            view = arena[offset:offset + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
            t.data = view
            offset += -(-nbytes // ALIGN) * ALIGN
            moved += nbytes
    if moved:
        # The old copies were freed, but glibc keeps freed heap memory (tensors under its mmap
        # threshold) for reuse: without a trim the process kept tens of MB it no longer used.
        trim = getattr(_LIBC, "malloc_trim", None)
        if trim is not None:
            trim(0)
        log.info("weights on transparent huge pages: %.0f MB", moved / 1e6)
    return moved
