"""The engine's thread count follows the container's CPU quota, not the node's core count
(cpu_budget.py), on cgroup v2 and v1 file layouts written here."""

from __future__ import annotations

import os

import pytest

from kubeinfer.worker import cpu_budget
from kubeinfer.worker.cpu_budget import cgroup_cpu_limit, cpu_budget as budget, default_threads


def _write(root, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def test_v2_quota_at_the_namespace_root(tmp_path):
    _write(tmp_path, "cpu.max", "200000 100000")
    assert cgroup_cpu_limit(str(tmp_path), proc_cgroup="0::/\n") == 2.0


def test_v2_quota_of_the_process_own_group_and_unlimited_root(tmp_path):
    _write(tmp_path, "cpu.max", "max 100000")
    _write(tmp_path, "kubepods/pod1/cpu.max", "150000 100000")
    assert cgroup_cpu_limit(str(tmp_path), proc_cgroup="0::/kubepods/pod1\n") == 1.5


def test_v1_quota_and_no_quota(tmp_path):
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "300000")
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(str(tmp_path), proc_cgroup="") == 3.0
    _write(tmp_path, "cpu,cpuacct/cpu.cfs_quota_us", "-1")
    assert cgroup_cpu_limit(str(tmp_path), proc_cgroup="") is None
    assert cgroup_cpu_limit(str(tmp_path / "absent"), proc_cgroup="") is None


@pytest.mark.parametrize("cpu_max,cpus,want", [
    ("150000 100000", 64, 1),   # 1.5 CPUs: two busy threads would be throttled a quarter of each period
    ("250000 100000", 64, 2),
    ("50000 100000", 64, 1),    # under one CPU: still one thread
    ("max 100000", 8, 8),       # no quota: the affinity mask decides
    ("800000 100000", 4, 4),    # a quota above the mask: the mask decides
])
def test_budget_is_the_mask_capped_by_the_quota_rounded_down(tmp_path, monkeypatch, cpu_max, cpus, want):
    _write(tmp_path, "cpu.max", cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert budget(str(tmp_path), proc_cgroup="0::/\n") == want


def test_torch_threads_are_lowered_to_the_budget_never_raised(tmp_path, monkeypatch):
    _write(tmp_path, "cpu.max", "200000 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_threads(64, str(tmp_path), proc_cgroup="0::/\n") == 2
    assert default_threads(2, str(tmp_path), proc_cgroup="0::/\n") is None
    assert default_threads(1, str(tmp_path), proc_cgroup="0::/\n") is None


def test_an_engine_without_num_threads_sets_torch_to_the_budget(monkeypatch, tiny_llama_dir):
    import torch

    from kubeinfer.worker import Engine
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_budget, "cpu_budget", lambda *a, **k: 1)
    try:
        torch.set_num_threads(2)
        Engine(model=tiny_llama_dir, max_model_len=64, num_kv_blocks=8)
        assert torch.get_num_threads() == 1
        Engine(model=tiny_llama_dir, max_model_len=64, num_kv_blocks=8, num_threads=2)
        assert torch.get_num_threads() == 2  # --threads wins over the budget
    finally:
        torch.set_num_threads(before)
