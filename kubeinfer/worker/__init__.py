"""The inference engine. Imports neither Ray nor Kubernetes.

The public names are imported lazily (PEP 562), so that torch-free modules of this package
(``kv_sizing``) can be imported where torch is not installed, as in the operator's image.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "kubeinfer.worker.engine",
    "EngineStats": "kubeinfer.worker.outputs",
    "EngineConfig": "kubeinfer.worker.config",
    "RequestOutput": "kubeinfer.worker.outputs",
    "SamplingParams": "kubeinfer.worker.sampling_params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
