"""A small async client for Ray's Serve REST API (the dashboard, port 8265 by default).

``PUT /api/serve/applications/`` replaces every application on the cluster, so one application is
added or removed by reading the declarative config (``GET``), changing that one entry and putting
the whole list back; a lock per client keeps two reconciles from losing each other's change.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping
from urllib.parse import urlsplit

import aiohttp

from kubeinfer.serve.autoscaling import DECISIONS_PATH
from kubeinfer.serve.config import DEFAULT_HTTP_PORT

APPLICATIONS_PATH = "/api/serve/applications/"


class ServeApiError(Exception):
    """The Serve REST API refused a request or could not be reached. ``transient`` says whether a
    retry may succeed (unreachable, 5xx) or the request itself is wrong (4xx: a bad config)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429


def deployed_applications(details: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The configs of the applications deployed declaratively (the ones a PUT would keep)."""
    return [dict(app["deployed_app_config"]) for app in (details.get("applications") or {}).values()
            if app.get("deployed_app_config")]


def config_with(details: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The PUT body that deploys ``config``'s applications and keeps every other one as it is."""
    ours = {app["name"] for app in config["applications"]}
    kept = [app for app in deployed_applications(details) if app.get("name") not in ours]
    return {**config, "applications": kept + list(config["applications"])}


def config_without(details: Mapping[str, Any], app_name: str) -> dict[str, Any] | None:
    """The PUT body that removes ``app_name`` and keeps the rest; None when it is not deployed."""
    apps = deployed_applications(details)
    if not any(app.get("name") == app_name for app in apps):
        return None
    body: dict[str, Any] = {"applications": [app for app in apps if app.get("name") != app_name]}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key):
            body[key] = details[key]
    return body


def cluster_host(address: str) -> str:
    """The host of the Ray cluster whose dashboard is at ``address`` (Serve's proxies listen there too)."""
    return urlsplit(address if "://" in address else f"http://{address}").hostname or "127.0.0.1"


def grpc_endpoint(address: str, grpc_port: int) -> str:
    """Where clients reach Serve's gRPC proxy on the cluster whose dashboard is at ``address``."""
    return f"{cluster_host(address)}:{grpc_port}"


class ServeApiClient:
    """Talks to one Ray cluster's Serve REST API at ``address``.

    Borrows an ``aiohttp.ClientSession`` (its owner closes it). Invariant: read-modify-write of the
    cluster's application list happens under ``self._lock``, one change at a time.
    """

    def __init__(self, session: aiohttp.ClientSession, address: str, timeout_s: float = 30.0,
                 http_port: int = DEFAULT_HTTP_PORT) -> None:
        self.address = address.rstrip("/")
        self.http_port = http_port
        # The ports Serve's proxies listen on, as the last ``details`` reported them (Serve keeps the
        # options it started with, whatever a later PUT asks for); empty until then.
        self.proxy_ports: dict[str, int] = {}
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._lock = asyncio.Lock()

    async def _request(self, method: str, body: Mapping[str, Any] | None = None, url: str | None = None) -> Any:
        url = url or self.address + APPLICATIONS_PATH
        try:
            async with self._session.request(method, url, json=body, timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise ServeApiError(f"{method} {url}: HTTP {resp.status}: {text[:2000]}", resp.status)
                return await resp.json(content_type=None) if text.strip() else None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ServeApiError(f"{method} {url}: {type(e).__name__}: {e}") from e

    async def details(self) -> dict[str, Any]:
        """Serve's view of the cluster: applications with their status, deployments and replicas."""
        details = await self._request("GET") or {}
        for proxy in ("http", "grpc"):
            port = (details.get(f"{proxy}_options") or {}).get("port")
            if isinstance(port, int) and 0 < port < 65536:
                self.proxy_ports[proxy] = port
        return details

    async def autoscaling_decisions(self, route_prefix: str) -> dict[str, Any]:
        """The last scale decision of each autoscaled model of the application at ``route_prefix``,
        from its router (``kubeinfer.serve.ingress``) through Serve's HTTP proxy on this cluster (at
        the port Serve reported, else ``http_port``)."""
        port = self.proxy_ports.get("http", self.http_port)
        url = f"http://{cluster_host(self.address)}:{port}{route_prefix}{DECISIONS_PATH}"
        body = await self._request("GET", url=url)
        models = body.get("models") if isinstance(body, dict) else None
        return models if isinstance(models, dict) else {}

    async def deploy(self, config: Mapping[str, Any]) -> None:
        """Deploy (or update in place) the applications in ``config``, keeping all others."""
        async with self._lock:
            await self._request("PUT", config_with(await self.details(), config))

    async def remove(self, app_name: str) -> bool:
        """Remove one application, keeping all others; False when it was not there."""
        async with self._lock:
            body = config_without(await self.details(), app_name)
            if body is None:
                return False
            await self._request("PUT", body)
            return True
