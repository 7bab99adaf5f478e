"""The kopf handlers that reconcile ModelDeployments: thin glue between kopf, the pure renderers
(``render``, ``spec``, ``capacity``, ``status``) and the two targets (``targets``).

Handlers live on their own ``registry`` (not kopf's default), so importing this module registers
nothing globally; ``kubeinfer operator`` and the tests hand it to ``kopf.operator``. Process-wide
state (clients, the chosen mode) is created at startup and carried in kopf's ``memo``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, NoReturn

import aiohttp
import kopf

from kubeinfer.operator.autoscaling_status import scale_change
from kubeinfer.operator.capacity import estimate_capacity
from kubeinfer.operator.kube import KubeClient, connection_info, is_transient, load_configuration
from kubeinfer.operator.render import GROUP, API_VERSION, PLURAL
from kubeinfer.operator.serve_api import ServeApiClient, ServeApiError
from kubeinfer.operator.settings import OperatorConfig
from kubeinfer.operator.spec import ModelDeploymentSpec, SpecError, parse_spec
from kubeinfer.operator.status import Observation, changed, deploying, failed, now_rfc3339, status_fields
from kubeinfer.operator.targets import RAYSERVICE_API, KubeRayTarget, ServeApiTarget, Target, desired_replicas

registry = kopf.OperatorRegistry()
RESOURCE = (GROUP, API_VERSION, PLURAL)
FINALIZER = "kubeinfer.io/finalizer"
STATUS_INTERVAL_S = 10.0
# The status timer waits until the object has been quiet this long, so it does not race the
# reconcile that a spec change has just started.
STATUS_IDLE_S = 5.0
# Ready-condition reasons meaning "nothing of this generation was deployed": the timer leaves them be.
REFUSALS = ("InvalidSpec", "InsufficientMemory", "DeployRejected")
MAX_RETRY_DELAY_S = 300.0
_WARNING_PHASES = ("Degraded", "Failed")


@kopf.on.startup(registry=registry)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = memo.setdefault("config", OperatorConfig.from_env())
    # kopf's bookkeeping goes in annotations: the CRD's structural schema would prune status.kopf.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubeinfer.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kubeinfer.io", key="last-handled-configuration")
    settings.posting.reporting_component = "kubeinfer-operator"
    memo.kube = KubeClient(load_configuration())
    memo.http = aiohttp.ClientSession()
    memo.serve_clients = {}  # address -> ServeApiClient, one lock per Ray cluster
    if config.mode == "auto":
        try:
            memo.kuberay = await memo.kube.serves(*RAYSERVICE_API)
        except Exception as e:
            raise kopf.TemporaryError(f"cannot discover the RayService API: {e}", delay=config.retry_delay_s)
    else:
        memo.kuberay = config.mode == "kuberay"
    logger.info("ModelDeployments go to %s", "KubeRay RayServices" if memo.kuberay
                else f"the Serve REST API (default {config.ray_address})")


@kopf.on.cleanup(registry=registry)
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if "http" in memo:
        await memo.http.close()
    if "kube" in memo:
        memo.kube.close()


@kopf.on.login(registry=registry)
def login(**_: Any) -> kopf.ConnectionInfo:
    return connection_info(load_configuration())


@kopf.on.probe(id="target", registry=registry)
def target_probe(memo: kopf.Memo, **_: Any) -> str:
    return "kuberay" if memo.get("kuberay") else "serve-api"


def _target(ray_address: str | None, memo: kopf.Memo) -> Target:
    """KubeRay unless the CR names a Ray cluster (``spec.rayAddress``) or the operator runs in
    Serve-API mode."""
    def serve_client(address: str) -> ServeApiClient:
        address = address.rstrip("/")
        if address not in memo.serve_clients:
            memo.serve_clients[address] = ServeApiClient(memo.http, address, memo.config.http_timeout_s,
                                                         memo.config.serve_http_port)
        return memo.serve_clients[address]

    if memo.kuberay and ray_address is None:
        return KubeRayTarget(memo.kube, serve_client, memo.config.kuberay_dashboard)
    return ServeApiTarget(serve_client(ray_address or memo.config.ray_address))


def _write_status(body: kopf.Body, patch: kopf.Patch, obs: Observation, endpoint: str | None,
                  generation: int | None, *, always_event: bool = False) -> None:
    """Queue the status for ``obs`` (only if it changes anything) and an Event when the phase or
    its reason changes (or ``always_event``)."""
    current = body.get("status") or {}
    fields = status_fields(current, obs, generation, endpoint, now_rfc3339())
    if changed(current, fields):
        patch.status.update(fields)
    if always_event or (current.get("phase"), _ready_reason(current)) != (obs.phase, obs.reason):
        event_type = "Warning" if obs.phase in _WARNING_PHASES else "Normal"
        kopf.event(body, type=event_type, reason=obs.reason, message=f"{obs.phase}: {obs.message}")


def _ready_reason(status: Mapping[str, Any]) -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)


def _refuse(body: kopf.Body, patch: kopf.Patch, reason: str, message: str) -> NoReturn:
    """Fail this generation for good: status and a Warning Event say why; kopf does not retry
    (a spec change starts over)."""
    _write_status(body, patch, failed(reason, message), None, body.meta.get("generation"), always_event=True)
    raise kopf.PermanentError(f"{reason}: {message}")


def _retry(body: kopf.Body, memo: kopf.Memo, retry: int, error: BaseException) -> NoReturn:
    """A failure that may pass (API server or Ray unreachable): say so, and let kopf retry later,
    backing off exponentially so an outage does not turn into a storm of attempts and Events."""
    message = f"{type(error).__name__}: {error}"
    kopf.warn(body, reason="TargetUnavailable", message=message)
    delay = min(memo.config.retry_delay_s * 2 ** min(retry, 10), MAX_RETRY_DELAY_S)
    raise kopf.TemporaryError(message, delay=delay)


@kopf.on.resume(*RESOURCE, registry=registry)
@kopf.on.create(*RESOURCE, registry=registry)
@kopf.on.update(*RESOURCE, field="spec", registry=registry)
async def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
                    retry: int, **_: Any) -> None:
    """Validate, check capacity, then deploy (or update in place) and report Deploying."""
    try:
        spec = parse_spec(body)
    except SpecError as e:
        _refuse(body, patch, "InvalidSpec", str(e))
    estimate = estimate_capacity(spec)
    if estimate.fits is False:
        _refuse(body, patch, "InsufficientMemory", estimate.message)
    if estimate.fits is None:
        logger.warning("capacity not checked: %s", estimate.message)
    target = _target(spec.ray_address, memo)
    try:
        await target.deploy(body, spec)
    except ServeApiError as e:
        if e.transient:
            _retry(body, memo, retry, e)
        _refuse(body, patch, "DeployRejected", str(e))
    except Exception as e:
        if is_transient(e):
            _retry(body, memo, retry, e)
        _refuse(body, patch, "DeployRejected", f"{type(e).__name__}: {e}")
    _write_status(body, patch, deploying(desired_replicas(spec)), target.endpoint(spec),
                  body.meta.get("generation"))


@kopf.timer(*RESOURCE, interval=STATUS_INTERVAL_S, idle=STATUS_IDLE_S, registry=registry)
async def refresh_status(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                         **_: Any) -> None:
    """Mirror what the target reports into the CR's status (phase, replicas, conditions)."""
    if not status.get("phase") or (status.get("phase") == "Failed" and _ready_reason(status) in REFUSALS):
        return  # not reconciled yet, or nothing deployed for this generation
    try:
        spec = parse_spec(body)
    except SpecError:
        return
    target = _target(spec.ray_address, memo)
    try:
        obs = await target.observe(spec)
    except ServeApiError as e:
        obs = Observation("Degraded", "TargetUnreachable", str(e), desired_replicas(spec), 0, counted=False)
    except Exception as e:
        if not is_transient(e):
            raise
        raise kopf.TemporaryError(f"cannot read the deployment's state: {e}", delay=memo.config.retry_delay_s)
    obs = _keep_counts(spec, status, obs)
    if obs.counted and obs.phase != "Failed" and obs.reason not in ("RayServiceMissing", "ApplicationMissing"):
        # Before the status write: a scale-up also moves the phase to Deploying ("Scaling") while
        # the new replica starts, and the count it reports is the one Serve's autoscaler set.
        auto, message = scale_change(spec, status, obs.replicas, now_rfc3339(), await _decisions(target, spec))
        if auto is not None:
            patch.status["autoscaling"] = auto
        if message is not None:
            kopf.event(body, type="Normal", reason="Scaled", message=message)
    _write_status(body, patch, obs, target.endpoint(spec), status.get("observedGeneration"))


def _keep_counts(spec: ModelDeploymentSpec, status: Mapping[str, Any], obs: Observation) -> Observation:
    """Under autoscaling, counts the target could not read (its Serve API unreachable, a RayService's
    status alone) would be the replicas asked for at deploy time: the status keeps the ones it has,
    stale rather than wrong, and no scale change is read from them."""
    kept = status.get("replicas")
    if obs.counted or spec.autoscaling is None or kept is None:
        return obs
    ready = kept if obs.ready_replicas >= obs.replicas else min(obs.ready_replicas, kept)
    return dataclasses.replace(obs, replicas=kept, ready_replicas=ready)


async def _decisions(target: Target, spec: ModelDeploymentSpec) -> list[Mapping[str, Any]]:
    """The policy's recent published decisions; none under Ray's default policy, or while the router
    cannot answer (the status keeps what it has and the next refresh asks again)."""
    if spec.autoscaling is None or spec.autoscaling.policy is None:
        return []
    try:
        return await target.autoscaling_decisions(spec)
    except (ServeApiError, ValueError):  # unreachable, or not JSON (a router without the endpoint)
        return []


@kopf.on.delete(*RESOURCE, registry=registry)
async def remove(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Delete what this ModelDeployment owns; then kopf removes the finalizer."""
    # Not parse_spec: a spec edited into an invalid one must still let go of what an earlier, valid
    # generation deployed (always named after the CR).
    target = _target((body.spec or {}).get("rayAddress") or None, memo)
    try:
        await target.remove(body.meta["namespace"], body.meta["name"])
    except ServeApiError as e:
        if not e.transient:
            raise kopf.PermanentError(str(e))
        raise kopf.TemporaryError(str(e), delay=memo.config.retry_delay_s)
    except Exception as e:
        if is_transient(e):
            raise kopf.TemporaryError(str(e), delay=memo.config.retry_delay_s)
        raise
    logger.info("removed the deployment of %s", body.meta["name"])
