"""The serving application's settings: what `kubeinfer serve` and the operator hand to Ray Serve.

Pure dataclasses (no Ray import) so the operator can render them without Ray installed. The
application builder (`kubeinfer.serve.app:build_app`) takes ``AppConfig.to_dict()`` as its Serve
``args``; one worker deployment per model, one router ingress in front.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kubeinfer.router.settings import POLICY_NAMES, RouterSettings  # noqa: F401 (POLICY_NAMES: for the CLI)
from kubeinfer.serve.autoscaling import POLICY_FUNCTION, PolicySettings
from kubeinfer.worker.config import QUANTIZATIONS, EngineConfig  # torch-free: the definitions only

# Ray Serve's AutoscalingConfig field names, passed through unchanged. ``policy`` may only name
# kubeinfer's LLM policy (``kubeinfer.serve.autoscaling``); without it Ray's default policy scales on
# ongoing requests.
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s",
                    "metrics_interval_s", "look_back_period_s", "upscaling_factor", "downscaling_factor",
                    "policy")


def check_autoscaling_policy(policy: object) -> None:
    """ValueError unless ``policy`` is an ``autoscaling_config.policy`` this app can run: Ray's
    shape (``policy_function``, ``policy_kwargs``) naming kubeinfer's policy with valid settings."""
    if not isinstance(policy, dict) or set(policy) - {"policy_function", "policy_kwargs"}:
        raise ValueError(f"autoscaling policy must be {{policy_function, policy_kwargs}}, got {policy!r}")
    if policy.get("policy_function") != POLICY_FUNCTION:
        raise ValueError(f"autoscaling policy_function must be {POLICY_FUNCTION}, got "
                         f"{policy.get('policy_function')!r}")
    try:
        PolicySettings(**(policy.get("policy_kwargs") or {}))
    except TypeError as e:
        raise ValueError(f"autoscaling policy_kwargs: {e}") from None
# The EngineConfig fields a deployment may set: all but those the model entry itself fixes.
ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig)
                    if f.name not in ("model", "quantization", "max_model_len"))
# EngineConfig.device's values, checked here too (without torch) so that `kubeinfer serve` and the
# operator refuse a bad one before any replica starts.
DEVICE_HELP = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$")


def check_device(device: object) -> str:
    """``device`` when it is one EngineConfig takes, else ValueError in EngineConfig's words."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"device must be {DEVICE_HELP}, got {device!r}")
    return device


@dataclass
class ModelSpec:
    """One served model: the name clients put in a request's ``model`` field, where the weights are,
    how the engine runs them, and how many worker replicas serve them.

    Invariants: exactly one of ``num_replicas`` / ``autoscaling`` is set (``num_replicas`` defaults
    to 1 when neither is given); ``engine`` and ``autoscaling`` only carry known keys; the engine's
    ``device`` and ``gpu_memory_utilization``, when set, are values EngineConfig takes; an
    autoscaling ``policy`` is kubeinfer's LLM policy with valid ``policy_kwargs``.
    ``ray_actor_options`` is Ray's (``num_cpus``, ``num_gpus``, ``memory``, ``resources``).
    """

    name: str = "smollm2-135m"
    uri: str = "builtin://smollm2-135m"
    quantization: str | None = None
    max_model_len: int | None = None
    engine: dict[str, Any] = field(default_factory=dict)
    num_replicas: int | None = None
    autoscaling: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r}: use 1-63 letters, digits, '.', '_' or '-'")
        if isinstance(self.quantization, str) and self.quantization.strip().lower() == "none":
            self.quantization = None  # as EngineConfig reads it (the CRD's default is none)
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or unset, "
                             f"got {self.quantization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        unknown = set(self.engine) - set(ENGINE_KEYS)
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)}; known: {', '.join(ENGINE_KEYS)}")
        check_device(self.engine.get("device", "auto"))
        util = self.engine.get("gpu_memory_utilization", 0.9)
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util!r}")
        if self.autoscaling is not None:
            if self.num_replicas is not None:
                raise ValueError("set num_replicas or autoscaling, not both")
            unknown = set(self.autoscaling) - set(AUTOSCALING_KEYS)
            if unknown:
                raise ValueError(f"unknown autoscaling settings {sorted(unknown)}")
            if self.autoscaling.get("policy") is not None:
                check_autoscaling_policy(self.autoscaling["policy"])
            lo, hi = self.autoscaling.get("min_replicas", 1), self.autoscaling.get("max_replicas", 1)
            if not 0 <= lo <= hi:
                raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {lo} and {hi}")
        elif self.num_replicas is None:
            self.num_replicas = 1
        elif self.num_replicas < 0:
            raise ValueError(f"num_replicas must be >= 0, got {self.num_replicas}")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``EngineConfig`` (validated there)."""
        return {"model": self.uri, "quantization": self.quantization,
                "max_model_len": self.max_model_len, **self.engine}

    def replica_engine_kwargs(self) -> dict[str, Any]:
        """``engine_kwargs`` for a Ray Serve replica, whose hardware is what it reserved from Ray.

        The device follows ``num_gpus``: ``auto`` (or unset) becomes ``cuda`` with a GPU and ``cpu``
        without. Ray shows a replica only the GPUs it reserved, numbered from 0, but one that reserved
        none sees every GPU of its node (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone then), and its
        engine's ``auto`` would take a GPU that Ray may hand to another replica. Asking for a device
        the reservation cannot give is a ValueError, before anything starts. torch's threads default
        to the reserved cores: torch counts the host's, which oversubscribes a shared node."""
        kwargs = self.engine_kwargs()
        gpus = self.ray_actor_options.get("num_gpus") or 0
        device = kwargs.get("device", "auto")
        if device == "auto":
            device = "cuda" if gpus else "cpu"
        elif device.startswith("cuda") and not gpus:
            raise ValueError(f"model {self.name!r}: device {device!r} needs a GPU reserved per replica "
                             "(ray_actor_options num_gpus; kubeinfer serve --gpus-per-replica 1): Ray would "
                             "not count the GPU it uses, and may give it to another replica")
        elif device.startswith("cuda:") and int(device[5:]) >= math.ceil(gpus):
            raise ValueError(f"model {self.name!r}: device {device!r}, but a replica sees only the "
                             f"{math.ceil(gpus)} GPU(s) it reserved, numbered from 0")
        elif device == "cpu" and gpus:
            raise ValueError(f"model {self.name!r}: device 'cpu' with num_gpus {gpus:g} would reserve a GPU "
                             "the replica never uses; use device cuda (or auto), or reserve no GPU")
        kwargs["device"] = device
        cpus = self.ray_actor_options.get("num_cpus")
        if kwargs.get("num_threads") is None and cpus:
            kwargs["num_threads"] = max(1, int(cpus))
        return kwargs


@dataclass
class AppConfig:
    """A whole serving application: the models (at least one, unique names) and the router.

    ``to_dict()`` / ``from_dict()`` round-trip through plain JSON-able data: that dict is the
    ``args`` of the Serve application ``kubeinfer.serve.app:build_app``.
    """

    models: list[ModelSpec] = field(default_factory=lambda: [ModelSpec()])
    router: RouterSettings = field(default_factory=RouterSettings)

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in self.models]
        if isinstance(self.router, dict):
            self.router = RouterSettings(**self.router)
        if not self.models:
            raise ValueError("an application needs at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown application settings {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:  # an unknown key inside a model or the router
            raise ValueError(str(e)) from None


APP_IMPORT_PATH = "kubeinfer.serve.app:build_app"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 9000
# Serve's gRPC proxy serves these services and forwards each method to the ingress deployment's
# method of the same name.
GRPC_SERVICER_FUNCTIONS = (
    "kubeinfer.proto.inference_pb2_grpc.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)


def serve_config(app_name: str, app: AppConfig, *, route_prefix: str = "/", http_host: str = "0.0.0.0",
                 http_port: int = DEFAULT_HTTP_PORT, grpc_port: int = DEFAULT_GRPC_PORT) -> dict[str, Any]:
    """The Ray Serve config (the schema of ``serve deploy``, the Serve REST API's PUT body and
    KubeRay's ``serveConfigV2``) that runs ``app`` as application ``app_name`` at ``route_prefix``.

    Several applications can share one Ray cluster: each needs its own name and route prefix, and
    gRPC clients pick theirs with the ``application`` metadata key."""
    if not _APP_NAME.match(app_name):
        raise ValueError(f"application name {app_name!r}: use 1-127 letters, digits, '.', '_' or '-'")
    if not route_prefix.startswith("/"):
        raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)},
        "applications": [{
            "name": app_name,
            "route_prefix": route_prefix,
            "import_path": APP_IMPORT_PATH,
            "args": app.to_dict(),
        }],
    }
