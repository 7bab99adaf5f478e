"""How many CPU threads this process may keep busy: its affinity mask and its cgroup's CPU quota.

torch sizes its intra-op pool from the cores it can see, which in a container is the node's (a pod
limited to 2 CPUs on a 64-core node would start 64 threads). The CFS quota then throttles them all
for the rest of every period: far slower than 2 threads. The engine sizes torch's threads (and so
the C++ kernels' pool) from ``cpu_budget()`` unless ``EngineConfig.num_threads`` is set.
"""

from __future__ import annotations

import logging
import math
import os

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _v2_limit(cpu_max: str | None) -> float | None:
    """``cpu.max`` is ``"<quota> <period>"`` or ``"max <period>"``."""
    if not cpu_max:
        return None
    quota, _, period = cpu_max.partition(" ")
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or 100000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v1_limit(directory: str) -> float | None:
    quota, period = _read(os.path.join(directory, "cpu.cfs_quota_us")), _read(os.path.join(directory, "cpu.cfs_period_us"))
    try:
        q, p = int(quota or -1), int(period or 0)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_group(proc_cgroup: str | None) -> str | None:
    """This process's cgroup v2 path from /proc/self/cgroup (its ``0::/path`` line)."""
    for line in (proc_cgroup or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup (v2 or v1), None when unlimited or
    unknown. ``proc_cgroup`` is /proc/self/cgroup's text (read when None)."""
    if proc_cgroup is None:
        proc_cgroup = _read("/proc/self/cgroup")
    limits = [_v2_limit(_read(os.path.join(root, "cpu.max")))]
    group = _own_group(proc_cgroup)
    if group and group != "/":
        limits.append(_v2_limit(_read(os.path.join(root, group.lstrip("/"), "cpu.max"))))
    for v1 in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        limits.append(_v1_limit(os.path.join(root, v1)))
    found = [x for x in limits if x is not None]
    return min(found) if found else None


def cpu_budget(root: str = CGROUP_ROOT, proc_cgroup: str | None = None) -> int:
    """Threads that can run at once without being throttled: the CPUs in this process's affinity
    mask, capped by the cgroup quota rounded down (a quota of 1.5 CPUs runs two busy threads for
    three quarters of each period and then stops both; at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def default_threads(current: int, root: str = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """The thread count to set when the user set none: ``cpu_budget()`` where it is below torch's
    ``current`` count, else None (keep torch's)."""
    budget = cpu_budget(root, proc_cgroup)
    return budget if budget < current else None


def fit_torch_threads() -> int | None:
    """Lower torch's intra-op threads to ``cpu_budget()`` where they exceed it (logged); returns the
    new count, or None when torch's own was kept."""
    import torch
    threads = default_threads(torch.get_num_threads())
    if threads is not None:
        log.info("torch threads: %d, this process's CPU budget (cgroup CPU limit %s; --threads overrides)",
                 threads, cgroup_cpu_limit())
        torch.set_num_threads(threads)
    return threads
