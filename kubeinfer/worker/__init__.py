"""The inference engine. Imports neither Ray nor Kubernetes."""

from kubeinfer.worker.config import EngineConfig
from kubeinfer.worker.engine import Engine, EngineStats
from kubeinfer.worker.outputs import RequestOutput
from kubeinfer.worker.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams"]
