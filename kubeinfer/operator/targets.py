"""Where a ModelDeployment's replicas run, behind one interface: a KubeRay ``RayService`` (+ its
Service) owned by the CR, or an application on an existing Ray cluster through its Serve REST API.

Each target deploys (create or update in place), observes (an ``Observation`` for the status) and
removes what one ModelDeployment put there. Objects come from the pure renderers in ``render``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import kopf

from kubeinfer.operator import render
from kubeinfer.operator.kube import KubeClient
from kubeinfer.operator.serve_api import ServeApiClient, ServeApiError, grpc_endpoint
from kubeinfer.operator.spec import ModelDeploymentSpec
from kubeinfer.operator.status import Observation, observe_rayservice, observe_serve_application
from kubeinfer.serve.config import DEFAULT_GRPC_PORT

RAYSERVICE_API = ("ray.io", "v1", "rayservices")


def desired_replicas(spec: ModelDeploymentSpec) -> int:
    """How many model replicas the deployment starts with (autoscaling: initial, else minimum)."""
    if spec.autoscaling is None:
        return spec.replicas or 0
    auto = spec.autoscaling
    return auto.initial_replicas if auto.initial_replicas is not None else auto.min_replicas


def worker_deployment(spec: ModelDeploymentSpec) -> str:
    """The Serve deployment holding the model replicas (``kubeinfer.serve.app.worker_options``)."""
    return f"worker-{spec.model.name}"


class Target(Protocol):
    """Runs one ModelDeployment's application somewhere; every method is idempotent."""

    def endpoint(self, spec: ModelDeploymentSpec) -> str: ...

    async def deploy(self, body: Mapping[str, Any], spec: ModelDeploymentSpec) -> None: ...

    async def observe(self, spec: ModelDeploymentSpec) -> Observation: ...

    async def remove(self, namespace: str, name: str) -> None: ...

    async def autoscaling_decisions(self, spec: ModelDeploymentSpec) -> list[Mapping[str, Any]]:
        """The model's recent decisions published by kubeinfer's autoscaling policy, oldest first."""
        ...


class KubeRayTarget:
    """A RayService and a Service per ModelDeployment, both named after it and owned by it
    (ownerReferences via ``kopf.adopt``). Removal deletes both explicitly rather than relying on
    the garbage collector, so the finalizer only lets go once they are gone.

    A RayService's status has no replica counts, so once it reports the application, ``observe``
    reads them from the cluster's Serve REST API at ``dashboard`` (a template of ``{service}``, the
    RayService's head Service, and ``{namespace}``; ``serve_client`` makes a client for an address)
    and falls back to the RayService's view when that cannot be read. None: the RayService's only."""

    def __init__(self, kube: KubeClient, serve_client: Callable[[str], ServeApiClient] | None = None,
                 dashboard: str | None = None) -> None:
        self._kube = kube
        self._serve_client = serve_client
        self._dashboard = dashboard

    def _serve_api(self, spec: ModelDeploymentSpec) -> ServeApiClient | None:
        if self._serve_client is None or self._dashboard is None:
            return None
        return self._serve_client(self._dashboard.format(service=render.rayservice_head_service(spec.name),
                                                         namespace=spec.namespace))

    def endpoint(self, spec: ModelDeploymentSpec) -> str:
        return render.service_endpoint(spec)

    async def deploy(self, body: Mapping[str, Any], spec: ModelDeploymentSpec) -> None:
        rayservice, service = render.build_rayservice(body), render.build_service(body)
        kopf.adopt([rayservice, service], owner=body)  # type: ignore[arg-type]
        await self._kube.apply(rayservice, RAYSERVICE_API[2])
        await self._kube.apply(service, "services")

    async def observe(self, spec: ModelDeploymentSpec) -> Observation:
        group, version, plural = RAYSERVICE_API
        rayservice = await self._kube.get(f"{group}/{version}", plural, spec.namespace, spec.name)
        obs = observe_rayservice(rayservice, spec.name, desired_replicas(spec))
        active = (((rayservice or {}).get("status") or {}).get("activeServiceStatus") or {})
        client = self._serve_api(spec)
        if client is None or spec.name not in (active.get("applicationStatuses") or {}):
            return obs  # no cluster serving the application yet: no dashboard to ask
        try:
            details = await client.details()
        except (ServeApiError, ValueError):  # unreachable (a NetworkPolicy, the head restarting), not JSON
            return obs  # the RayService's view
        counted = observe_serve_application(details, spec.name, [worker_deployment(spec)])
        return obs if counted.reason == "ApplicationMissing" else counted

    async def remove(self, namespace: str, name: str) -> None:
        group, version, plural = RAYSERVICE_API
        await self._kube.delete(f"{group}/{version}", plural, namespace, name)
        await self._kube.delete("v1", "services", namespace, name)

    async def autoscaling_decisions(self, spec: ModelDeploymentSpec) -> list[Mapping[str, Any]]:
        """From the application's router through Serve's HTTP proxy on the head (route ``/``)."""
        client = self._serve_api(spec)
        return [] if client is None else _records((await client.autoscaling_decisions("")).get(spec.model.name))


class ServeApiTarget:
    """One Serve application per ModelDeployment on the Ray cluster behind ``client``, named
    ``<namespace>.<name>`` and routed at ``/<namespace>/<name>`` so several share the cluster;
    other applications on it are left as they are. gRPC clients send the application name as the
    ``application`` metadata key."""

    def __init__(self, client: ServeApiClient) -> None:
        self._client = client

    def endpoint(self, spec: ModelDeploymentSpec) -> str:
        # Serve's gRPC port as the cluster reports it: one started before us keeps its own.
        return grpc_endpoint(self._client.address, self._client.proxy_ports.get("grpc", DEFAULT_GRPC_PORT))

    async def deploy(self, body: Mapping[str, Any], spec: ModelDeploymentSpec) -> None:
        await self._client.deploy(render.build_serve_config(body))

    async def observe(self, spec: ModelDeploymentSpec) -> Observation:
        details = await self._client.details()
        app = render.serve_api_app_name(spec.namespace, spec.name)
        return observe_serve_application(details, app, [worker_deployment(spec)])

    async def remove(self, namespace: str, name: str) -> None:
        await self._client.remove(render.serve_api_app_name(namespace, name))

    async def autoscaling_decisions(self, spec: ModelDeploymentSpec) -> list[Mapping[str, Any]]:
        """From the application's router through Serve's HTTP proxy (its route prefix)."""
        route = render.serve_api_route_prefix(spec.namespace, spec.name)
        return _records((await self._client.autoscaling_decisions(route)).get(spec.model.name))


def _records(value: Any) -> list[Mapping[str, Any]]:
    """The decisions a router served for one model: a list of objects (anything else: none)."""
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []
