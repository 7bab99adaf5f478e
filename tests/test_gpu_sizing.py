"""GPU KV-pool sizing (worker/gpu_memory.py) without a GPU: the profiling step runs for real, through
the engine's own model and backend on the CPU; only torch.cuda's memory counters, which need a
device, are replaced by a scripted device. tests/test_cuda.py checks the same on a real GPU.
"""

from __future__ import annotations

import pytest
import torch

from kubeinfer.worker.cuda_graphs import capture_sizes
from kubeinfer.worker.gpu_memory import GIB, MemoryProfile, check_free_memory, profile_memory
from kubeinfer.worker.kernels.torch_backend import TorchBackend
from kubeinfer.worker.models.loader import load_model

TOTAL = 80 * GIB


class ScriptedDevice:
    """torch.cuda's memory queries, answered from counters the test sets; records the profile's calls."""

    def __init__(self, allocated: int, peak: int, reserved: int, free: int) -> None:
        self.allocated, self.peak, self.reserved, self.free = allocated, peak, reserved, free
        self.calls: list[str] = []

    def install(self, monkeypatch) -> None:
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: self.calls.append(_n))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: self.reserved)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (self.free, TOTAL))


def test_profile_runs_the_largest_step_and_leaves_the_rest_to_the_kv_pool(monkeypatch, tiny_llama_dir):
    backend = TorchBackend("cpu", torch.float32)
    model = load_model(tiny_llama_dir, torch.float32, 256, backend=backend).model
    device = ScriptedDevice(allocated=2 * GIB, peak=2 * GIB + 3 * GIB, reserved=6 * GIB, free=TOTAL - 7 * GIB)
    device.install(monkeypatch)
    profile = profile_memory(model, backend, num_tokens=96, num_sample_rows=8, block_size=16, max_model_len=256,
                             kv_int8=False, utilization=0.9)
    assert device.calls[:3] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]
    scratch = 2 * 2 * 6 * 16 * 32 * 4  # K and V, 2 layers, ceil(96/16) blocks of 16 tokens, 2 heads x 16 dims, fp32
    assert profile.weights == 2 * GIB
    assert profile.activation_peak == 3 * GIB - scratch
    assert profile.non_torch == 1 * GIB  # used 7 GiB, of which torch reserved 6
    want = int(0.9 * TOTAL) - 2 * GIB - profile.activation_peak - 1 * GIB
    assert profile.kv_cache_bytes == want
    assert backend.max_seq_len == 256  # the dummy step ran through the backend's own metadata


def test_pool_never_exceeds_what_is_free():
    crowded = MemoryProfile(total=TOTAL, budget=int(0.9 * TOTAL), weights=GIB, activation_peak=GIB, non_torch=0,
                            free_after=10 * GIB)  # another process holds most of the device
    assert crowded.kv_cache_bytes == 9 * GIB
    assert MemoryProfile(TOTAL, GIB, 2 * GIB, GIB, 0, 50 * GIB).kv_cache_bytes == 0


def test_a_crowded_device_is_refused_at_start(monkeypatch):
    ScriptedDevice(0, 0, 0, free=40 * GIB).install(monkeypatch)
    with pytest.raises(ValueError, match="only 40.0 GiB of the device's 80.0 GiB is free"):
        check_free_memory(torch.device("cuda"), 0.9)
    check_free_memory(torch.device("cuda"), 0.45)


def test_capture_sizes_cover_every_batch_up_to_the_limit():
    assert capture_sizes(1) == [1]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = capture_sizes(512)
    assert sizes[-1] == 512 and sizes == sorted(set(sizes)) and 256 in sizes and 272 in sizes
