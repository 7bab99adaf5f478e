"""The operator's Kubernetes client for the objects it owns (RayService, Service): credentials, and
create-or-patch / read / delete that never block the event loop.

The blocking ``kubernetes`` client runs in worker threads; kopf gets the same credentials through
its login handler, so both talk to the same cluster as the same identity.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account credentials, else the kubeconfig named by $KUBECONFIG (read now,
    not at import) or ~/.kube/config. Returns a fresh Configuration; the client's global default is
    left alone."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        kubernetes.config.load_kube_config(config_file=path, client_configuration=config)
    return config


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """kopf's view of the same credentials (what kopf's own ``login_via_client`` extracts)."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        username=config.username or None, password=config.password or None, scheme=scheme, token=token,
        certificate_path=config.cert_file, private_key_path=config.key_file)


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: the API server unreachable, overloaded, timing out or conflicting."""
    if isinstance(error, ApiException):
        return error.status is None or error.status in (409, 429) or error.status >= 500
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith("urllib3")


class KubeClient:
    """Reads, applies and deletes the namespaced objects the operator owns.

    Owns one ``ApiClient`` (its connection pool); ``close()`` releases it. Supports core ``v1``
    Services and any custom resource (``group/version`` + plural); ``apply`` creates an object or,
    when it exists, merge-patches it in place (never PUT), so a spec change keeps its identity.
    """

    def __init__(self, config: kubernetes.client.Configuration) -> None:
        self._api = kubernetes.client.ApiClient(config)
        self._core = kubernetes.client.CoreV1Api(self._api)
        self._custom = kubernetes.client.CustomObjectsApi(self._api)

    def close(self) -> None:
        self._api.close()

    async def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``group/version`` (API discovery, which
        needs no RBAC beyond being authenticated)."""
        try:
            found = await asyncio.to_thread(self._custom.get_api_resources, group, version)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.name == plural for r in found.resources or [])

    async def get(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            if api_version == "v1":
                got = await asyncio.to_thread(self._core.read_namespaced_service, name, namespace)
                return self._api.sanitize_for_serialization(got)
            group, version = api_version.split("/")
            return await asyncio.to_thread(self._custom.get_namespaced_custom_object,
                                           group, version, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    async def apply(self, obj: dict[str, Any], plural: str) -> None:
        """Create ``obj`` if absent, else replace its spec in place (a JSON patch of ``/spec``, so
        keys the new spec drops go too). A Service is merge-patched instead: its spec holds
        server-assigned fields (clusterIP) that a replace would try to clear."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if obj["apiVersion"] == "v1":
            create = lambda: self._core.create_namespaced_service(namespace, obj)  # noqa: E731
            patch = lambda: self._core.patch_namespaced_service(  # noqa: E731
                name, namespace, {"metadata": {"labels": meta.get("labels")}, "spec": obj["spec"]},
                _content_type=MERGE_PATCH)
        else:
            group, version = obj["apiVersion"].split("/")
            create = lambda: self._custom.create_namespaced_custom_object(  # noqa: E731
                group, version, namespace, plural, obj)
            patch = lambda: self._custom.patch_namespaced_custom_object(  # noqa: E731
                group, version, namespace, plural, name,
                [{"op": "replace", "path": "/spec", "value": obj["spec"]}], _content_type=JSON_PATCH)
        if await self.get(obj["apiVersion"], plural, namespace, name) is None:
            try:
                await asyncio.to_thread(create)
                return
            except ApiException as e:
                if e.status != 409:  # 409: created meanwhile by someone else, so patch it
                    raise
        await asyncio.to_thread(patch)

    async def delete(self, api_version: str, plural: str, namespace: str, name: str) -> bool:
        """Delete an object; False when it was already gone."""
        try:
            if api_version == "v1":
                await asyncio.to_thread(self._core.delete_namespaced_service, name, namespace)
            else:
                group, version = api_version.split("/")
                await asyncio.to_thread(self._custom.delete_namespaced_custom_object,
                                        group, version, namespace, plural, name)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True
