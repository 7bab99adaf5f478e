"""The operator's own settings: where replicas go (KubeRay or a Ray cluster's Serve REST API) and how
long to wait on the Serve API and between retries. Read once from flags and the environment, then
carried in kopf's memo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from kubeinfer.serve.config import DEFAULT_HTTP_PORT

MODES = ("auto", "kuberay", "serve-api")
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
ENV_MODE = "KUBEINFER_OPERATOR_MODE"
ENV_RAY_ADDRESS = "KUBEINFER_RAY_ADDRESS"
ENV_SERVE_HTTP_PORT = "KUBEINFER_SERVE_HTTP_PORT"
ENV_KUBERAY_DASHBOARD = "KUBEINFER_KUBERAY_DASHBOARD"
# A RayService's dashboard: KubeRay's head Service for it, which follows the cluster serving traffic.
DEFAULT_KUBERAY_DASHBOARD = "http://{service}.{namespace}.svc:8265"


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator needs beyond kopf's own settings.

    ``mode``: ``kuberay`` renders a RayService per ModelDeployment, ``serve-api`` applies the
    application to the Ray cluster at ``ray_address`` (the dashboard, port 8265), ``auto`` picks
    KubeRay when the RayService API is served. A ModelDeployment with ``spec.rayAddress`` always
    uses the Serve API at that address; ``serve_http_port`` is where Serve's HTTP proxy listens on
    such a cluster when its Serve API does not say (the operator reads each application's
    autoscaling decisions there).
    ``kuberay_dashboard``: where a RayService's Serve REST API is, a template of ``{service}`` (KubeRay's
    head Service of the RayService) and ``{namespace}``; the operator reads the replica counts there,
    which a RayService's status lacks. None: not read (the status then has the counts it was asked
    for). Invariant: ``mode`` is one of ``MODES``; durations > 0; the port is in 1-65535.
    """

    mode: str = "auto"
    ray_address: str = DEFAULT_RAY_ADDRESS
    http_timeout_s: float = 30.0
    retry_delay_s: float = 10.0
    serve_http_port: int = DEFAULT_HTTP_PORT
    kuberay_dashboard: str | None = DEFAULT_KUBERAY_DASHBOARD

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"operator mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if min(self.http_timeout_s, self.retry_delay_s) <= 0:
            raise ValueError("http_timeout_s and retry_delay_s must be > 0")
        if not 0 < self.serve_http_port < 65536:
            raise ValueError(f"serve_http_port must be in 1-65535, got {self.serve_http_port!r}")
        if self.kuberay_dashboard is not None:
            try:
                self.kuberay_dashboard.format(service="s", namespace="n")
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"kuberay_dashboard may name only {{service}} and {{namespace}}, got "
                                 f"{self.kuberay_dashboard!r}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: object) -> OperatorConfig:
        """Settings from ``KUBEINFER_OPERATOR_MODE`` / ``KUBEINFER_RAY_ADDRESS`` /
        ``KUBEINFER_SERVE_HTTP_PORT`` / ``KUBEINFER_KUBERAY_DASHBOARD``; keyword arguments
        that are not None (e.g. command-line flags) win over the environment."""
        values: dict[str, object] = {}
        if environ.get(ENV_MODE):
            values["mode"] = environ[ENV_MODE]
        if environ.get(ENV_RAY_ADDRESS):
            values["ray_address"] = environ[ENV_RAY_ADDRESS]
        if ENV_KUBERAY_DASHBOARD in environ:  # set empty: do not read RayServices' dashboards
            values["kuberay_dashboard"] = environ[ENV_KUBERAY_DASHBOARD] or None
        if environ.get(ENV_SERVE_HTTP_PORT):
            try:
                values["serve_http_port"] = int(environ[ENV_SERVE_HTTP_PORT])
            except ValueError:
                raise ValueError(f"{ENV_SERVE_HTTP_PORT} must be a port number, got {environ[ENV_SERVE_HTTP_PORT]!r}") \
                    from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
