"""A ModelDeployment's spec as typed, validated dataclasses, and its mapping onto the serving
application's settings (``kubeinfer.serve.config.AppConfig``).

The CRD's schema (manifests/crd.yaml) applies the same defaults and most of the same bounds, but the
operator cannot rely on it: an API server without the CRD's defaulting (or an older CRD) hands over
partial objects, and some checks (what a model uri points at, which builtin models exist) need code.
Everything wrong ends in one ``SpecError`` whose message names the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, dataclass, field, fields, make_dataclass
from types import MappingProxyType
from typing import Any, Mapping

from kubernetes.utils.quantity import parse_quantity

from kubeinfer.operator.autoscaling_spec import parse_policy
from kubeinfer.operator.model_source import BUILTIN_MODELS, DEFAULT_MODEL_URI, ModelDims, ModelSource, SpecError
from kubeinfer.serve.autoscaling import PolicySettings, ray_policy
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
# torch-free (the operator image has no torch): the engine's own definitions of its settings and sizes.
from kubeinfer.worker.config import DEPLOYMENT_DEFAULTS, QUANTIZATIONS, EngineConfig

# The Ray custom resource each KubeRay worker pod advertises once, so that exactly one model replica
# lands on each worker pod and none on the head (which hosts the router).
REPLICA_RESOURCE = "kubeinfer_replica"

# The ModelDeployment's name becomes a Service name (a DNS-1035 label) and KubeRay derives longer
# names from the RayService's (``<name>-<suffix>-head-svc`` must stay within 63 characters).
_DEPLOYMENT_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 40
_RAY_ADDRESS = re.compile(r"^https?://[^\s/]+/?$")


def parse_bytes(value: Any, where: str) -> int:
    """A Kubernetes quantity (``4Gi``, ``512M``, 1000) as a whole number of bytes."""
    try:
        return int(math.ceil(parse_quantity(value)))
    except (ValueError, TypeError) as e:
        raise SpecError(f"{where}: {value!r} is not a Kubernetes quantity such as 4Gi ({e})") from None


def parse_cores(value: Any, where: str) -> float:
    """A Kubernetes CPU quantity (``2``, ``500m``) as a number of cores."""
    try:
        return float(parse_quantity(value))
    except (ValueError, TypeError) as e:
        raise SpecError(f"{where}: {value!r} is not a CPU quantity such as 2 or 500m ({e})") from None


@dataclass(frozen=True)
class ModelSettings:
    """``spec.model``: the weights, the name clients request, quantization and context length,
    and the model's dimensions (builtin, from the spec's hints, or unknown).

    Invariant: ``max_model_len`` does not exceed the model's known context length.
    """

    source: ModelSource
    name: str
    quantization: str | None = None
    max_model_len: int = DEPLOYMENT_DEFAULTS["max_model_len"]
    dims: ModelDims = field(default_factory=ModelDims)

    def __post_init__(self) -> None:
        try:
            ModelSpec(name=self.name)  # the serving contract's own rule for model names
        except ValueError as e:
            raise SpecError(f"spec.model.name: {e}") from None
        if self.quantization not in (None, *QUANTIZATIONS[1:]):  # "none" is parsed as None
            raise SpecError(f"spec.model.quantization must be none, int8 or int4, got {self.quantization!r}")
        if self.max_model_len < 1:
            raise SpecError(f"spec.model.maxModelLen must be >= 1, got {self.max_model_len}")
        if self.dims.max_context is not None and self.max_model_len > self.dims.max_context:
            raise SpecError(f"spec.model.maxModelLen {self.max_model_len} exceeds the model's context "
                            f"length {self.dims.max_context}")


def _crd_fields(section: str) -> dict[str, Field]:
    """The EngineConfig fields a ModelDeployment sets under ``spec.<section>``, by their CRD key."""
    return {f.metadata["crd"].partition(".")[2]: f for f in fields(EngineConfig)
            if (f.metadata.get("crd") or "").partition(".")[0] == section}


def deployment_default(f: Field) -> Any:
    """A setting's default in a ModelDeployment: EngineConfig's, unless DEPLOYMENT_DEFAULTS says otherwise."""
    return DEPLOYMENT_DEFAULTS.get(f.name, f.default)


# spec.engine's keys and the EngineConfig fields they set: taken from EngineConfig's own ``crd``
# metadata, so the parser, the Serve config and the CRD name the same settings (a test holds the CRD
# schema and docs/crd.md to this list).
ENGINE_FIELDS: Mapping[str, Field] = MappingProxyType(_crd_fields("engine"))
_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
# spec.engine values that mean EngineConfig's None (the CRD needs a string default to show).
_NONE_SPELLINGS: Mapping[str, tuple[str, ...]] = MappingProxyType({"speculative.method": ("none",),
                                                                   "speculative.draftQuantization": ("none",)})
# spec.engine values that are model uris: the engine gets the path the replica's pod sees them at.
_MODEL_URIS = frozenset({"speculative.draftModel"})


def crd_value(section: Mapping[str, Any], key: str, where: str) -> Any:
    """The value at ``key`` (``maxNumSeqs``, or a nested block's ``speculative.method``) of a spec section,
    None where absent. A block that is not an object is a SpecError naming it."""
    *blocks, leaf = key.split(".")
    for i, block in enumerate(blocks):
        section = section.get(block) or {}
        if not isinstance(section, Mapping):
            raise SpecError(f"{where}.{'.'.join(blocks[:i + 1])} must be an object, got {type(section).__name__}")
    return section.get(leaf)


def _check_engine(self) -> None:
    for key, f in ENGINE_FIELDS.items():
        value, kind = getattr(self, f.name), f.type.replace(" | None", "")
        if value is None and "None" in f.type:
            continue
        ok = {"bool": isinstance(value, bool), "str": isinstance(value, str),
              "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
        if not ok:
            raise SpecError(f"spec.engine.{key} must be {_TYPE_WORDS[kind]}, got {value!r}")
    try:  # EngineConfig's own checks (torch-free when no quantization is given), in the CRD's names
        EngineConfig(device="cpu", **{f.name: getattr(self, f.name) for f in ENGINE_FIELDS.values()})
    except ValueError as e:
        message = str(e)
        for key, f in sorted(ENGINE_FIELDS.items(), key=lambda kv: -len(kv[1].name)):
            message = re.sub(rf"\b{f.name}\b", f"spec.engine.{key}", message)
        raise SpecError(message) from None


# ``spec.engine``, parsed: a frozen dataclass with EngineConfig's field names, types and (deployment)
# defaults for each of ENGINE_FIELDS, built from that list rather than spelled out a second time.
# ``kv_cache_memory_bytes`` None sizes the KV pool for ``max_model_len x max_num_seqs`` tokens on a CPU
# when the model's dimensions are known (capacity.kv_pool_bytes); on a GPU the engine sizes it from
# ``gpu_memory_utilization``.
EngineSettings = make_dataclass(
    "EngineSettings", [(f.name, f.type, field(default=deployment_default(f))) for f in ENGINE_FIELDS.values()],
    frozen=True, namespace={"__post_init__": _check_engine, "__module__": __name__,
                            "__doc__": "``spec.engine`` as EngineConfig keywords (see ENGINE_FIELDS)."})


@dataclass(frozen=True)
class Autoscaling:
    """``spec.autoscaling``: Ray Serve's autoscaling_config for the model's worker replicas.

    Invariants: ``0 <= min_replicas <= max_replicas``, ``max_replicas >= 1``, ``initial_replicas``
    within them, delays >= 0, ``downscale_to_zero_delay_s`` only with ``min_replicas == 0``;
    ``policy`` None is Ray's default (ongoing requests), else kubeinfer's LLM policy
    (kubeinfer.operator.autoscaling_spec parses it).
    """

    max_replicas: int
    min_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    policy: PolicySettings | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise SpecError("spec.autoscaling: need 0 <= minReplicas <= maxReplicas and maxReplicas >= 1, "
                            f"got {self.min_replicas} and {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise SpecError(f"spec.autoscaling.initialReplicas {self.initial_replicas} is outside "
                            f"[minReplicas {self.min_replicas}, maxReplicas {self.max_replicas}]")
        if self.target_ongoing_requests <= 0:
            raise SpecError("spec.autoscaling.targetOngoingRequests must be > 0")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.downscale_to_zero_delay_s or 0) < 0:
            raise SpecError("spec.autoscaling: delays must be >= 0 seconds")
        if self.downscale_to_zero_delay_s is not None and self.min_replicas != 0:
            raise SpecError("spec.autoscaling.downscaleToZeroDelaySeconds needs minReplicas: 0")

    def to_ray(self) -> dict[str, Any]:
        """Ray Serve's ``autoscaling_config`` (keys from ``kubeinfer.serve.config.AUTOSCALING_KEYS``)."""
        ray = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
               "initial_replicas": self.initial_replicas, "target_ongoing_requests": self.target_ongoing_requests,
               "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
               "downscale_to_zero_delay_s": self.downscale_to_zero_delay_s, "policy": ray_policy(self.policy)}
        return {k: v for k, v in ray.items() if v is not None}


@dataclass(frozen=True)
class Resources:
    """``spec.resources``: what one model replica gets. ``cpu`` / ``memory`` / ``gpu_memory`` keep
    the quantities as written (for pod specs); the ``*_bytes`` / ``cpu_cores`` views are numbers.

    Invariants: cpu > 0, memory > 0, gpus in {0, 1} (the engine runs a model on one device),
    ``gpu_memory`` only with a GPU.
    """

    cpu: str = "1"
    memory: str = "4Gi"
    gpus: int = 0
    gpu_memory: str | None = None

    def __post_init__(self) -> None:
        if self.cpu_cores <= 0 or self.memory_bytes <= 0:
            raise SpecError(f"spec.resources: cpu and memory must be > 0, got {self.cpu} and {self.memory}")
        if self.gpus not in (0, 1):
            raise SpecError(f"spec.resources.gpus must be 0 or 1 (one device per replica), got {self.gpus}")
        if self.gpu_memory is not None and (self.gpus == 0 or self.gpu_memory_bytes <= 0):
            raise SpecError("spec.resources.gpuMemory needs gpus: 1 and a positive quantity")

    @property
    def cpu_cores(self) -> float:
        return parse_cores(self.cpu, "spec.resources.cpu")

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory, "spec.resources.memory")

    @property
    def gpu_memory_bytes(self) -> int | None:
        return None if self.gpu_memory is None else parse_bytes(self.gpu_memory, "spec.resources.gpuMemory")


@dataclass(frozen=True)
class ModelDeploymentSpec:
    """One ModelDeployment, parsed: its identity, model, engine, scaling, resources, router and
    placement (``draft_source``: a draft model's uri, whose path in the pod the engine settings hold).
    Invariants: the name is a DNS-1035 label of at most 40 characters; ``replicas`` and
    ``autoscaling`` are never both set (``replicas`` is 1 when neither was); the combination is
    one the engine can run (e.g. no unchunked prefill with a step smaller than a prompt).
    """

    name: str
    namespace: str
    model: ModelSettings
    engine: EngineSettings = field(default_factory=EngineSettings)
    replicas: int | None = 1
    autoscaling: Autoscaling | None = None
    resources: Resources = field(default_factory=Resources)
    router: RouterSettings = field(default_factory=RouterSettings)
    image: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    ray_address: str | None = None
    draft_source: ModelSource | None = None  # spec.engine.speculative.draftModel, as given

    def __post_init__(self) -> None:
        if not _DEPLOYMENT_NAME.match(self.name) or len(self.name) > MAX_NAME_LENGTH:
            raise SpecError(f"metadata.name {self.name!r}: use at most {MAX_NAME_LENGTH} lowercase letters, "
                            "digits and '-', starting with a letter (it names a Service and a RayService)")
        if (self.replicas is None) == (self.autoscaling is None):
            raise SpecError("set spec.replicas or spec.autoscaling, not both")
        if self.replicas is not None and self.replicas < 0:
            raise SpecError(f"spec.replicas must be >= 0, got {self.replicas}")
        if not self.engine.enable_chunked_prefill and self.engine.max_num_batched_tokens < self.model.max_model_len:
            raise SpecError(f"spec.engine.chunkedPrefill: false needs maxNumBatchedTokens "
                            f"({self.engine.max_num_batched_tokens}) >= spec.model.maxModelLen ({self.model.max_model_len})")
        if self.draft_source is not None and self.engine.speculative_method != "draft":
            raise SpecError("spec.engine.speculative.draftModel needs speculative.method: draft")
        if self.ray_address is not None and not _RAY_ADDRESS.match(self.ray_address):
            raise SpecError(f"spec.rayAddress {self.ray_address!r}: use the Ray dashboard's http(s)://HOST:PORT")


def _section(spec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"spec.{key} must be an object, got {type(value).__name__}")
    return value


def _pick(section: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The CR's camelCase fields that are present, under the dataclass's snake_case names."""
    return {attr: section[key] for key, attr in names.items() if section.get(key) is not None}


def _model_dims(source: ModelSource, model: Mapping[str, Any]) -> ModelDims:
    if source.scheme == "builtin":
        return BUILTIN_MODELS[source.uri.partition("://")[2]]
    arch = model.get("architecture") or {}
    vocab, hidden = arch.get("vocabSize"), arch.get("hiddenSize")
    return ModelDims(parameter_count=model.get("parameterCount"),
                     float_params=vocab * hidden if vocab and hidden else 0,
                     num_layers=arch.get("numLayers"), num_kv_heads=arch.get("numKvHeads"),
                     head_dim=arch.get("headDim"), hidden_size=hidden, max_context=arch.get("maxContext"))


def _policy(auto: Mapping[str, Any]) -> PolicySettings | None:
    try:
        return parse_policy(auto)
    except ValueError as e:
        raise SpecError(str(e)) from None


def parse_spec(body: Mapping[str, Any]) -> ModelDeploymentSpec:
    """The ModelDeployment object (``metadata`` + ``spec``) as a validated ModelDeploymentSpec.
    Missing fields take the CRD's defaults. Raises SpecError naming the first problem."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise SpecError("spec must be an object")
    try:
        model = _section(spec, "model")
        source = ModelSource(str(model.get("uri") or DEFAULT_MODEL_URI))
        quantization = model.get("quantization", "none")
        model_settings = ModelSettings(
            source=source,
            name=model.get("name") or (source.uri.partition("://")[2] if source.scheme == "builtin"
                                       else str(meta.get("name", ""))),
            quantization=None if quantization in (None, "none") else quantization,
            dims=_model_dims(source, model), **_pick(model, {"maxModelLen": "max_model_len"}))
        engine = _section(spec, "engine")
        given = {key: value for key in ENGINE_FIELDS
                 if (value := crd_value(engine, key, "spec.engine")) is not None}
        sources = {key: ModelSource(str(given[key]), f"spec.engine.{key}") for key in _MODEL_URIS & set(given)}
        engine_settings = EngineSettings(**{
            ENGINE_FIELDS[key].name: parse_bytes(value, f"spec.engine.{key}")
            if ENGINE_FIELDS[key].name.endswith("_bytes") else sources[key].local_path if key in sources
            else None if value in _NONE_SPELLINGS.get(key, ()) else value for key, value in given.items()})
        autoscaling = None
        if spec.get("autoscaling") is not None:
            auto = _section(spec, "autoscaling")
            if auto.get("maxReplicas") is None:
                raise SpecError("spec.autoscaling.maxReplicas is required")
            autoscaling = Autoscaling(**_pick(auto, {
                "minReplicas": "min_replicas", "maxReplicas": "max_replicas", "initialReplicas": "initial_replicas",
                "targetOngoingRequests": "target_ongoing_requests", "upscaleDelaySeconds": "upscale_delay_s",
                "downscaleDelaySeconds": "downscale_delay_s",
                "downscaleToZeroDelaySeconds": "downscale_to_zero_delay_s"}), policy=_policy(auto))
        resources = Resources(**{k: str(v) if k != "gpus" else v for k, v in _pick(_section(spec, "resources"), {
            "cpu": "cpu", "memory": "memory", "gpus": "gpus", "gpuMemory": "gpu_memory"}).items()})
        try:
            router = RouterSettings(**_pick(_section(spec, "router"), {
                "policy": "policy", "maxInFlight": "max_in_flight", "maxQueued": "max_queued",
                "batchWindowMs": "batch_window_ms", "maxBatchSize": "max_batch_size",
                "requestTimeoutSeconds": "request_timeout_s", "replicas": "num_replicas",
                "maxCapacityWaitSeconds": "max_capacity_wait_s", "maxN": "max_n"}))
        except ValueError as e:
            raise SpecError(f"spec.router: {e}") from None
        replicas = spec.get("replicas")
        return ModelDeploymentSpec(
            name=str(meta.get("name", "")), namespace=str(meta.get("namespace") or "default"),
            model=model_settings, engine=engine_settings,
            replicas=replicas if replicas is not None or autoscaling is not None else 1,
            autoscaling=autoscaling, resources=resources, router=router, image=spec.get("image") or None,
            node_selector=dict(spec.get("nodeSelector") or {}),
            tolerations=tuple(spec.get("tolerations") or ()), ray_address=spec.get("rayAddress") or None,
            draft_source=sources.get("speculative.draftModel"))
    except TypeError as e:  # a field of the wrong type, e.g. a string where a number belongs
        raise SpecError(f"spec: {e}") from None


def to_app_config(spec: ModelDeploymentSpec, *, pin_to_worker_pods: bool = False) -> AppConfig:
    """The serving application for ``spec``: one model (the worker deployment) behind the router.

    ``pin_to_worker_pods`` (KubeRay mode) makes each replica need the custom resource that only the
    rendered worker pods advertise, one per pod; a plain Ray cluster (Serve-API mode) has no such
    resource, so it is off there.
    """
    from kubeinfer.operator.capacity import kv_pool_bytes  # capacity imports this module's types

    res = spec.resources
    actor: dict[str, Any] = {"num_cpus": res.cpu_cores, "memory": res.memory_bytes}
    if res.gpus:
        actor["num_gpus"] = res.gpus
    if pin_to_worker_pods:
        actor["resources"] = {REPLICA_RESOURCE: 1}
    # The device is explicit, never "auto": a replica that asked Ray for a GPU and cannot see one
    # must fail at start with the engine's message, not fall back to a CPU many times slower; and a
    # CPU replica on a node with GPUs sees them all (Ray leaves CUDA_VISIBLE_DEVICES alone when none
    # is reserved) but must not take one that Ray may give to a GPU replica.
    engine: dict[str, Any] = {"device": "cuda" if res.gpus else "cpu",
                              **{f.name: getattr(spec.engine, f.name) for f in ENGINE_FIELDS.values()}}
    # On a CPU the pool is what the capacity check counted (room for maxNumSeqs full sequences);
    # None leaves the engine to size it (a GPU's free memory, or a model of unknown size).
    pool = kv_pool_bytes(spec)
    if pool is None:
        del engine["kv_cache_memory_bytes"]
    else:
        engine["kv_cache_memory_bytes"] = pool
    if not res.gpus:
        # torch sizes its thread pool from the host's cores, not the pod's CPU limit: oversubscribed.
        engine["num_threads"] = max(1, int(res.cpu_cores))
    model = ModelSpec(
        name=spec.model.name, uri=spec.model.source.local_path, quantization=spec.model.quantization,
        max_model_len=spec.model.max_model_len, engine=engine, num_replicas=spec.replicas,
        autoscaling=spec.autoscaling.to_ray() if spec.autoscaling else None, ray_actor_options=actor)
    return AppConfig(models=[model], router=spec.router)
