"""The Triton kernel modules, imported so that they run in Triton's interpreter on the CPU.

Imported first by every tests/test_triton_*.py file. ``triton.jit`` decides at decoration time whether
a function is interpreted, for triton's own helpers (``tl.zeros``, ``tl.sum``, ...) when triton is
imported and for ours when the kernel modules are. So TRITON_INTERPRET=1 is set before either is
imported; if something imported triton first (in a full run, ``transformers.modeling_utils`` does at
collection), triton's Python modules are imported afresh and the kernel modules reloaded (the decode
module before the attention module, which takes its helpers). Triton also reads the flag at launch
time, so the ``triton_interpreter`` fixture (import it into the test module: it is autouse) keeps it
set while a module's tests run and restores it afterwards. Interpreter cost grows with programs x loop
steps, so the tests use small shapes.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest


def _is_interpreted(triton_module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton_module.language.zeros, InterpretedFunction)


def _import_interpreted_triton():
    import triton
    if not _is_interpreted(triton):
        # Keep the compiled extension (it cannot be initialised twice); re-run the Python modules.
        for name in [m for m in sys.modules if m.split(".")[0] == "triton" and not m.startswith("triton._C")]:
            del sys.modules[name]
        import triton
    return triton


_previous = os.environ.get("TRITON_INTERPRET")


def _restore_interpret() -> None:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous


os.environ["TRITON_INTERPRET"] = "1"
try:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    _triton = _import_interpreted_triton()
    import torch
    from kubeinfer.worker.kernels import triton_decode as td
    from kubeinfer.worker.kernels import triton_attention as ta
    from kubeinfer.worker.kernels import triton_matmul as tm
    from kubeinfer.worker.kernels import triton_norm as tn
    KERNEL_MODULES = (td, ta, tm, tn)  # reload order: ta imports td's helpers
    for _mod in KERNEL_MODULES:
        if _mod.triton is not _triton or not _mod._INTERPRET:  # imported before: decorate the kernels again
            importlib.reload(_mod)
finally:
    _restore_interpret()

if not (_is_interpreted(_triton) and all(m._INTERPRET for m in KERNEL_MODULES)):
    pytest.skip("the triton interpreter could not be enabled (triton.knobs.runtime.interpret forced off?)",
                allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()


TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` has ``dtype`` and matches the fp32 ``ref`` rounded to it, within that dtype's tolerance."""
    tol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=tol, rtol=tol)
