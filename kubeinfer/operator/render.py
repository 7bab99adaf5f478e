"""The objects the operator creates for a ModelDeployment, as pure functions of its body.

One ``build_*`` function per object, no I/O: the Serve config (Serve-API mode), the KubeRay
``RayService`` and the ``Service`` in front of it (KubeRay mode). Each parses the body with
``parse_spec`` and so raises ``SpecError`` for a spec that cannot be deployed.

Topology (KubeRay mode): the head pod runs Ray's GCS, the Serve controller, a proxy and the router
replicas; each worker pod runs exactly one model replica (it advertises one unit of
``REPLICA_RESOURCE``, which every model replica requires) and a proxy. Worker pods are sized from
``spec.resources``; with autoscaling, Ray's in-tree autoscaler adds and removes worker pods as Serve
adds and removes replicas. A ``pvc://`` model's claim is mounted read-only on the head too: the
router there loads the model's tokenizer and config from the same path the workers load weights from.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping

import yaml

from kubeinfer.operator.model_source import PVC_MOUNT_ROOT
from kubeinfer.operator.spec import REPLICA_RESOURCE, ModelDeploymentSpec, parse_spec, to_app_config
from kubeinfer.serve.config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, serve_config

VERSION = "0.1.0"
RAY_VERSION = "2.60.0"
# The images the chart (helm/kubeinfer/values.yaml) and docker/ build and reference; a test keeps
# them in step.
OPERATOR_IMAGE = f"ghcr.io/kubeinfer/operator:{VERSION}"
WORKER_IMAGE = f"ghcr.io/kubeinfer/worker:{VERSION}"
WORKER_IMAGE_CUDA = f"ghcr.io/kubeinfer/worker-cuda:{VERSION}"

GROUP, API_VERSION, KIND, PLURAL = "kubeinfer.io", "v1alpha1", "ModelDeployment", "modeldeployments"
DEPLOYMENT_LABEL = "kubeinfer.io/model-deployment"
# KubeRay labels a pod ray.io/serve=true while its Serve proxy is healthy; its own serve Service
# selects on it, and so does ours.
RAY_SERVE_LABEL = "ray.io/serve"
# The head hosts the router replicas and Ray's control processes, not the model.
HEAD_MEMORY = "2Gi"
# Ray's object store (in /dev/shm) only carries request/response objects here, so a small one suffices;
# it is added on top of the replica's memory so that the replica's own memory stays whole.
OBJECT_STORE_BYTES = 256 << 20
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of rayproject/ray images (and of our worker images)


def labels(name: str, component: str) -> dict[str, str]:
    """The labels every object (and pod) rendered for ModelDeployment ``name`` carries."""
    return {"app.kubernetes.io/name": "kubeinfer", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "kubeinfer",
            "app.kubernetes.io/managed-by": "kubeinfer-operator", DEPLOYMENT_LABEL: name}


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """The controller owner reference that makes an object belong to the ModelDeployment ``body``."""
    meta = body["metadata"]
    return {"apiVersion": f"{GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def service_endpoint(spec: ModelDeploymentSpec) -> str:
    """The in-cluster gRPC address of the rendered Service (``status.endpoint`` in KubeRay mode)."""
    return f"{spec.name}.{spec.namespace}.svc:{DEFAULT_GRPC_PORT}"


def rayservice_head_service(name: str) -> str:
    """The head Service KubeRay keeps for the RayService ``name`` (it follows the cluster serving
    traffic): ``<name>-head-svc``, cut as KubeRay's CheckName cuts it (the last 50 characters, and
    an ``r`` for a first character that is a digit or punctuation)."""
    service = f"{name}-head-svc"[-50:]
    return "r" + service[1:] if not service[0].isalpha() else service


def serve_api_app_name(namespace: str, name: str) -> str:
    """The application of a ModelDeployment on a shared Ray cluster: unique across namespaces
    (neither part can contain a dot)."""
    return f"{namespace}.{name}"


def serve_api_route_prefix(namespace: str, name: str) -> str:
    """Where its HTTP surface lives on a shared Ray cluster: ``/<namespace>/<name>/v1/...``."""
    return f"/{namespace}/{name}"


def build_kuberay_serve_config(body: Mapping[str, Any]) -> dict[str, Any]:
    """The RayService's serveConfigV2: the cluster is the ModelDeployment's own, so the application
    takes its name and the route ``/``, and replicas are pinned to worker pods."""
    spec = parse_spec(body)
    return serve_config(spec.name, to_app_config(spec, pin_to_worker_pods=True))


def build_serve_config(body: Mapping[str, Any]) -> dict[str, Any]:
    """Serve-API mode's PUT body for ``body``: one application per ModelDeployment, named and routed
    by namespace and name, so several can share one Ray cluster."""
    spec = parse_spec(body)
    return serve_config(serve_api_app_name(spec.namespace, spec.name), to_app_config(spec),
                        route_prefix=serve_api_route_prefix(spec.namespace, spec.name))


def _hardened_security_context() -> dict[str, Any]:
    # Ray writes its session files under /tmp and its home, so the root filesystem stays writable.
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _container(name: str, image: str, resources: dict[str, str], ports: list[tuple[str, int]],
               mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "image": image, "imagePullPolicy": "IfNotPresent",
            # Requests equal limits: Ray sizes itself from the limits, and a replica must not be
            # squeezed by neighbours on the node.
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports],
            "volumeMounts": mounts, "securityContext": _hardened_security_context()}


def _pod_template(spec: ModelDeploymentSpec, component: str, container: dict[str, Any],
                  volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes,
                           "securityContext": {"fsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}}}
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    return {"metadata": {"labels": labels(spec.name, component)}, "spec": pod}


def _quantity(n_bytes: int) -> str:
    return f"{n_bytes >> 20}Mi" if n_bytes % (1 << 20) == 0 else str(n_bytes)


def _shm_volume(size_bytes: int) -> dict[str, Any]:
    return {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(size_bytes)}}


def _storage(spec: ModelDeploymentSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (volumeMounts, volumes) of a Ray pod that loads the model or its tokenizer: Ray's object
    store in memory, and a pvc:// model's claim, read-only, where ``ModelSource.local_path`` points.
    Both groups need the claim: the workers load the weights, and the head runs the router, whose
    ingress loads the tokenizer (and the model's config) from the same path. A pvc:// draft model
    (``speculative.draftModel``) in another claim is mounted beside it, the same way."""
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [_shm_volume(OBJECT_STORE_BYTES)]
    claims = [spec.model.source.claim, spec.draft_source.claim if spec.draft_source else None]
    for name, claim in zip(("model", "draft"), claims):
        if claim is not None and (name == "model" or claim != claims[0]):
            mounts.append({"name": name, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
    return mounts, volumes


def _head_group(spec: ModelDeploymentSpec, image: str) -> dict[str, Any]:
    cpus = str(max(1, spec.router.num_replicas))
    mounts, volumes = _storage(spec)
    container = _container("ray-head", image, {"cpu": cpus, "memory": HEAD_MEMORY},
                           [("gcs", 6379), ("dashboard", 8265), ("client", 10001),
                            ("serve", DEFAULT_HTTP_PORT), ("grpc", DEFAULT_GRPC_PORT)], mounts)
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": cpus, "num-gpus": "0"},
            "template": _pod_template(spec, "ray-head", container, volumes)}


def _worker_group(spec: ModelDeploymentSpec, image: str) -> dict[str, Any]:
    res = spec.resources
    limits = {"cpu": res.cpu, "memory": _quantity(res.memory_bytes + OBJECT_STORE_BYTES)}
    if res.gpus:
        limits["nvidia.com/gpu"] = str(res.gpus)
    mounts, volumes = _storage(spec)
    container = _container("ray-worker", image, limits,
                           [("serve", DEFAULT_HTTP_PORT), ("grpc", DEFAULT_GRPC_PORT)], mounts)
    if spec.autoscaling:
        auto = spec.autoscaling
        lo, hi = auto.min_replicas, auto.max_replicas
        start = auto.initial_replicas if auto.initial_replicas is not None else lo
    else:
        lo = hi = start = spec.replicas or 0
    return {
        "groupName": "replica", "replicas": start, "minReplicas": lo, "maxReplicas": hi,
        "rayStartParams": {
            # ray start takes whole CPUs; the replica itself asks for the exact (maybe fractional) share.
            "num-cpus": str(max(1, math.ceil(res.cpu_cores))), "num-gpus": str(res.gpus),
            "memory": str(res.memory_bytes), "object-store-memory": str(OBJECT_STORE_BYTES),
            # KubeRay passes this through a shell: the quotes and backslashes are part of the value.
            "resources": '"' + json.dumps({REPLICA_RESOURCE: 1}).replace('"', '\\"') + '"'},
        "template": _pod_template(spec, "ray-worker", container, volumes)}


def build_rayservice(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ray.io/v1`` RayService running ``body``'s application on its own Ray cluster."""
    spec = parse_spec(body)
    image = spec.image or (WORKER_IMAGE_CUDA if spec.resources.gpus else WORKER_IMAGE)
    config = build_kuberay_serve_config(body)
    cluster: dict[str, Any] = {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": spec.autoscaling is not None,
                               "headGroupSpec": _head_group(spec, image),
                               "workerGroupSpecs": [_worker_group(spec, image)]}
    if spec.autoscaling:
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default",
            # A worker pod whose replica Serve has removed is released after this long.
            "idleTimeoutSeconds": 60,
            "securityContext": _hardened_security_context()}
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec.name, "rayservice")},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False), "rayClusterConfig": cluster}}


def build_service(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ClusterIP Service in front of the RayService's healthy Serve proxies: gRPC and HTTP."""
    spec = parse_spec(body)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels(spec.name, "endpoint")},
            "spec": {"type": "ClusterIP",
                     "selector": {DEPLOYMENT_LABEL: spec.name, RAY_SERVE_LABEL: "true"},
                     "ports": [{"name": "grpc", "port": DEFAULT_GRPC_PORT, "targetPort": "grpc",
                                "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
                               {"name": "http", "port": DEFAULT_HTTP_PORT, "targetPort": "serve",
                                "protocol": "TCP", "appProtocol": "http"}]}}


def render_objects(documents: Iterable[Mapping[str, Any] | None], mode: str = "kuberay") -> list[dict[str, Any]]:
    """What ``kubeinfer render`` prints: for each ModelDeployment among ``documents`` (others are
    skipped), its RayService and Service (``kuberay``) or its Serve config (``serve-api``)."""
    if mode not in ("kuberay", "serve-api"):
        raise ValueError(f"mode must be kuberay or serve-api, got {mode!r}")
    out: list[dict[str, Any]] = []
    for doc in documents:
        if not doc or doc.get("kind") != KIND:
            continue
        if mode == "serve-api":
            out.append(build_serve_config(doc))
        else:
            out += [build_rayservice(doc), build_service(doc)]
    return out


class _LiteralDumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as readable ``|`` blocks."""


_LiteralDumper.add_representer(
    str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """Objects as one multi-document YAML string, keys in build order."""
    return yaml.dump_all(list(objects), Dumper=_LiteralDumper, sort_keys=False)
