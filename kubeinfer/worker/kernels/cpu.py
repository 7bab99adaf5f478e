"""The C++ CPU kernels (cpu_kernels.cpp and the sources it binds), one build per ISA tier.

A tier is a fixed instruction-set baseline, never ``-march=native``: a cache directory shared
between nodes (a mounted volume, a container image) must not hand a newer node's code to an older
one, where it would fault. The tiers, each a superset of the one before:

* ``avx2``: AVX2, FMA, F16C (every x86 server CPU of the last decade; AMD Zen 2/3).
* ``avx512``: + AVX-512 F/BW/VL/DQ, VNNI and BF16 (Zen 4, Sapphire Rapids and later; Ice Lake
  and Skylake-X lack AVX512-BF16 and take ``avx2``).
* ``amx``: + AMX tiles for bf16 and int8 (Sapphire Rapids and later).

At start the best tier this CPU supports is chosen from /proc/cpuinfo's flags, once, and logged;
``KUBEINFER_CPU_ISA=avx2|avx512|amx`` forces a lower one (so a lower tier can be tested and measured
on a newer machine; asking for more than the CPU has is clamped to its best, with a warning). Only
the tiers actually loaded are built: each takes ~30-40 s once with a C++ compiler, and is cached
under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) by tier and source digest, so
later processes (and every Ray replica on the machine) load it in milliseconds. Without a compiler
(or on a CPU without AVX2) the engine keeps the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from types import ModuleType

log = logging.getLogger(__name__)

ENV_VAR = "KUBEINFER_CPU_ISA"
TIERS = ("avx2", "avx512", "amx")
# /proc/cpuinfo flags each tier needs beyond the previous one, and the compiler flags that allow
# exactly those instructions.
_TIER_CPU_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"),
    "amx": ("amx_tile", "amx_bf16", "amx_int8"),
}
_TIER_CFLAGS = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16"),
    "amx": ("-mamx-tile", "-mamx-bf16", "-mamx-int8"),
}

_DIR = os.path.dirname(__file__)
_SOURCES = [os.path.join(_DIR, name)
            for name in ("cpu_kernels.cpp", "paged_attention.cpp", "prefill_attention.cpp", "amx_linear.cpp",
                         "quant_gemv.cpp", "int8_gemm.cpp", "q4_gemm.cpp", "decode_stack.cpp", "sampling_kernel.cpp")]
_HEADERS = [os.path.join(_DIR, name) for name in ("simd.h", "common.h", "quant_dot.h", "parallel.h")]


def tier_cflags(tier: str) -> list[str]:
    """The ISA flags of ``tier``: its own and every lower tier's."""
    flags: list[str] = []
    for t in TIERS[:TIERS.index(tier) + 1]:
        flags += _TIER_CFLAGS[t]
    return flags


def supported_tiers(cpu_flags: frozenset[str] | set[str]) -> list[str]:
    """The tiers a CPU with these /proc/cpuinfo flags can run, lowest first (each needs the last)."""
    tiers: list[str] = []
    for tier in TIERS:
        if not all(flag in cpu_flags for flag in _TIER_CPU_FLAGS[tier]):
            break
        tiers.append(tier)
    return tiers


def choose_tier(requested: str | None, supported: list[str]) -> str | None:
    """The tier to run: ``requested`` (``KUBEINFER_CPU_ISA``) if the CPU has it, else the best it has.

    Raises ValueError for a name that is no tier; returns None when the CPU supports none.
    """
    requested = (requested or "").strip().lower() or None
    if requested is not None and requested not in TIERS:
        raise ValueError(f"{ENV_VAR}={requested!r} is not an ISA tier: use one of {', '.join(TIERS)}")
    if not supported:
        return None
    if requested is None:
        return supported[-1]
    if requested not in supported:
        log.warning("%s=%s: this CPU cannot run that tier (it needs %s); using its best tier, %s", ENV_VAR,
                    requested, ", ".join(f for t in TIERS[:TIERS.index(requested) + 1] for f in _TIER_CPU_FLAGS[t]),
                    supported[-1])
        return supported[-1]
    return requested


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_tiers() -> list[str]:
    """The tiers this CPU can run, lowest first."""
    return supported_tiers(_cpu_flags())


def selected_tier() -> str | None:
    """The tier ``load_cpu_kernels()`` loads: the best this CPU has, or ``KUBEINFER_CPU_ISA``'s."""
    return _selected_tier(os.environ.get(ENV_VAR))


@functools.cache
def _selected_tier(requested: str | None) -> str | None:
    return choose_tier(requested, cpu_tiers())  # cached: the clamp warning is logged once


def load_cpu_kernels(tier: str | None = None) -> ModuleType | None:
    """The compiled module for ``tier`` (default: ``selected_tier()``), or None (logged once) when it
    cannot be built here. The module's ``tier`` attribute names the tier it was built for.

    Raises ValueError for an unknown tier, or for one this CPU cannot run.
    """
    if tier is None:
        tier = selected_tier()
        if tier is None:
            _log_no_tier()
            return None
    elif tier not in TIERS:
        raise ValueError(f"unknown ISA tier {tier!r}: use one of {', '.join(TIERS)}")
    elif tier not in cpu_tiers():
        raise ValueError(f"this CPU cannot run the {tier} tier (it supports: {', '.join(cpu_tiers()) or 'none'})")
    return _load(tier)


@functools.cache
def _log_no_tier() -> None:
    log.warning("C++ CPU kernels unavailable: this CPU has no AVX2+FMA+F16C (the lowest ISA tier); "
                "using the torch path")


@functools.cache
def _load(tier: str) -> ModuleType | None:
    try:
        _put_ninja_on_path()
        from torch.utils.cpp_extension import load
        cflags = ["-O3", *tier_cflags(tier), "-fopenmp", "-fvisibility=hidden", f"-DKUBEINFER_HEADERS={_headers_digest()}"]
        # One build directory per tier (never the machine's flags) and per installed copy of the
        # sources: torch rebuilds a directory when a source or a flag changes (its version hash; a
        # header's change reaches it through that flag), and its build file names the sources by
        # path, so two checkouts sharing one directory (CI beside a dev tree) would rebuild it for
        # each other on every load. Hidden visibility keeps two tiers' builds loaded in one process
        # from binding each other's functions.
        where = hashlib.sha256(os.path.realpath(_DIR).encode()).hexdigest()[:8]
        module = load(name=f"kubeinfer_cpu_{tier}_{where}", sources=_SOURCES, verbose=False, extra_cflags=cflags,
                      extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a read-only cache dir: the torch path still works
        log.warning("C++ CPU kernels (%s tier) unavailable, using the torch path (%s: %s)", tier, type(e).__name__, e)
        return None
    module.tier = tier
    log.info("C++ CPU kernels: ISA tier %s (this CPU supports %s; %s=%s)", tier, ", ".join(cpu_tiers()), ENV_VAR,
             os.environ.get(ENV_VAR, "unset"))
    return module


def _headers_digest() -> str:
    digest = hashlib.sha256()
    for path in _HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv's python run by its full path does not have the
    pip-installed one there."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return  # load() then raises a clear "Ninja is required" error
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
