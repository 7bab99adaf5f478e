"""The C++ CPU kernels (cpu_kernels.cpp), built on first use with torch's extension builder.

The build needs a C++ compiler; it takes about 40 s once and is cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), so later processes (and every Ray
replica on the machine) load it in milliseconds. Without a compiler the engine keeps the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from types import ModuleType

log = logging.getLogger(__name__)

_DIR = os.path.dirname(__file__)
_SOURCES = [os.path.join(_DIR, name) for name in ("cpu_kernels.cpp", "paged_attention.cpp", "amx_linear.cpp")]
_HEADERS = [os.path.join(_DIR, name) for name in ("simd.h", "common.h")]


@functools.cache
def load_cpu_kernels() -> ModuleType | None:
    """The compiled module, or None (logged once) when it cannot be built here."""
    try:
        _put_ninja_on_path()
        from torch.utils.cpp_extension import load
        # -march=native code for one CPU faults on an older one: a cache directory shared between
        # node types (a mounted volume) gets one build per instruction set, never the wrong one.
        return load(name=f"kubeinfer_cpu_kernels_{_cpu_digest()}", sources=_SOURCES, verbose=False,
                    extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DKUBEINFER_HEADERS={_headers_digest()}"],
                    extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a read-only cache dir: the torch path still works
        log.warning("C++ CPU kernels unavailable, using the torch path (%s: %s)", type(e).__name__, e)
        return None


def _headers_digest() -> str:
    """torch decides whether to rebuild from the sources' contents and the flags; a header's change
    reaches it through this flag."""
    digest = hashlib.sha256()
    for path in _HEADERS:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _cpu_digest() -> str:
    """A short digest of this CPU's instruction-set flags (Linux's /proc/cpuinfo), or of its
    platform name elsewhere."""
    flags = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), flags)
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


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
