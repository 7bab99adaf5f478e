"""The operator's own settings: where replicas go (KubeRay or a Ray cluster's Serve REST API) and how
long to wait on the Serve API and between retries. Read once from flags and the environment, then
carried in kopf's memo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

MODES = ("auto", "kuberay", "serve-api")
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
ENV_MODE = "KUBEINFER_OPERATOR_MODE"
ENV_RAY_ADDRESS = "KUBEINFER_RAY_ADDRESS"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs beyond kopf's own settings.

    ``mode``: ``kuberay`` renders a RayService per ModelDeployment, ``serve-api`` applies the
    application to the Ray cluster at ``ray_address`` (the dashboard, port 8265), ``auto`` picks
    KubeRay when the RayService API is served. A ModelDeployment with ``spec.rayAddress`` always
    uses the Serve API at that address. Invariant: ``mode`` is one of ``MODES``; durations > 0.
    """

    mode: str = "auto"
    ray_address: str = DEFAULT_RAY_ADDRESS
    http_timeout_s: float = 30.0
    retry_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"operator mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if min(self.http_timeout_s, self.retry_delay_s) <= 0:
            raise ValueError("http_timeout_s and retry_delay_s must be > 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: object) -> OperatorConfig:
        """Settings from ``KUBEINFER_OPERATOR_MODE`` / ``KUBEINFER_RAY_ADDRESS``; keyword arguments
        that are not None (e.g. command-line flags) win over the environment."""
        values: dict[str, object] = {}
        if environ.get(ENV_MODE):
            values["mode"] = environ[ENV_MODE]
        if environ.get(ENV_RAY_ADDRESS):
            values["ray_address"] = environ[ENV_RAY_ADDRESS]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
