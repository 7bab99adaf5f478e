"""Whether Triton can run here, asked without importing it (importing triton takes a second)."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """Triton runs kernels in its interpreter (TRITON_INTERPRET=1): how CI runs them on a CPU."""
    triton = sys.modules.get("triton")
    if triton is not None:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
