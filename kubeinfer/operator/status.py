"""A ModelDeployment's status, computed from what its target reports: pure functions, no I/O.

The target is either a KubeRay ``RayService`` (``status.activeServiceStatus.applicationStatuses``)
or a Ray cluster's Serve REST API (``GET /api/serve/applications/``). Both become an
``Observation``; ``status_fields`` turns one into the CR's status (phase, replica counts, endpoint,
conditions Ready / Progressing / Degraded) keeping ``lastTransitionTime`` across non-transitions.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

PHASES = ("Pending", "Deploying", "Ready", "Degraded", "Failed")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
# Serve's application and deployment states (ray.serve.schema.ApplicationStatus, DeploymentStatus).
_APP_DEPLOYING = {"NOT_STARTED", "DEPLOYING"}
_DEPLOYMENT_BUSY = {"UPDATING", "UPSCALING", "DOWNSCALING"}


@dataclass(frozen=True)
class Observation:
    """What a target says about one ModelDeployment at one moment.

    Invariants: ``phase`` is one of ``PHASES``; ``reason`` is a CamelCase word (a condition
    reason); ``0 <= ready_replicas``; ``replicas`` is the number the target is driving towards.
    ``counted``: the counts are Serve's; False when they are inferred from a RayService's status
    (the replicas asked for at deploy time, which autoscaling moves away from).
    """

    phase: str
    reason: str
    message: str
    replicas: int = 0
    ready_replicas: int = 0
    counted: bool = True

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"unknown phase {self.phase!r}")


def failed(reason: str, message: str, replicas: int = 0) -> Observation:
    """A deployment the operator refuses (bad spec, does not fit) or the target rejected."""
    return Observation("Failed", reason, message, replicas, 0)


def deploying(replicas: int, message: str = "applied; waiting for the replicas") -> Observation:
    return Observation("Deploying", "Deploying", message, replicas, 0)


_FAILING = ("UNHEALTHY", "DEPLOY_FAILED")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The line that ends a Python traceback: ``ValueError: ...``, ``torch.OutOfMemoryError: ...``.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: \S")
_LEAD_CHARS, _CAUSE_CHARS = 240, 600


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def readable(message: str | None) -> str:
    """One line out of a Serve status message. Serve puts a replica's whole traceback (with terminal
    colours) after its own sentence; a condition and an Event need that sentence and the exception
    at the end, e.g. ``The deployment failed to start 3 times in a row. ...: ValueError: device
    'cuda' was asked for, but this machine has no CUDA device ...``."""
    lines = [line.rstrip() for line in _ANSI.sub("", message or "").strip().splitlines()]
    if not lines:
        return ""
    ends = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)
            and not line.endswith("Traceback (most recent call last):")]
    if not ends or not any(line.lstrip().startswith("File ") for line in lines):
        return _clip(" ".join(line.strip() for line in lines if line.strip()), _LEAD_CHARS + _CAUSE_CHARS)
    # Serve's own sentence, unless the message is the bare traceback.
    lead = "" if lines[0].startswith("Traceback") or ends[-1] == 0 else lines[0].removesuffix("Error:").rstrip(" :.")
    cause = " ".join(line.strip() for line in lines[ends[-1]:] if line.strip())
    return f"{_clip(lead, _LEAD_CHARS)}: {_clip(cause, _CAUSE_CHARS)}" if lead else _clip(cause, _CAUSE_CHARS)


def _notes(deployments: Mapping[str, Any], statuses: Iterable[str] | None = None) -> str:
    """What the deployments not HEALTHY say: those in ``statuses`` (named even with no message), or
    else every one that has a message (a replica failing to start or waiting for resources)."""
    notes = []
    for name, d in sorted(deployments.items()):
        status, text = d.get("status"), readable(d.get("message"))
        if status == "HEALTHY" or (statuses is not None and status not in statuses):
            continue
        if statuses is not None or text:
            notes.append(f"{name} ({status})" + (f": {text}" if text else ""))
    return "; ".join(notes)


def _from_app_state(app_status: str | None, app_message: str, deployments: Mapping[str, Any],
                    replicas: int, ready: int) -> Observation:
    """The phase rules shared by both targets, given Serve's application state.

    Messages prefer the deployments' own: when a replica cannot start (say its engine asks for a GPU
    the node lacks), the application only says ``Failed to update the deployments [...]``, while the
    deployment carries the replica's exception."""
    failing = _notes(deployments, _FAILING)
    message = failing or readable(app_message)
    if app_status is None or app_status in _APP_DEPLOYING:
        message = _notes(deployments) or readable(app_message)
        return Observation("Deploying", "Deploying", message or "the application is starting", replicas, ready)
    if app_status == "DEPLOY_FAILED":
        return Observation("Failed", "DeployFailed", message or "the application failed to deploy", replicas, 0)
    if app_status == "DELETING":
        return Observation("Pending", "Deleting", message or "the application is being deleted", replicas, 0)
    if app_status == "UNHEALTHY" or failing:
        return Observation("Degraded", "Unhealthy", message or "the application is unhealthy", replicas, ready)
    if app_status == "RUNNING":
        counts = f"{ready}/{replicas} replicas ready"
        if any(d.get("status") in _DEPLOYMENT_BUSY for d in deployments.values()) or ready < replicas:
            notes = _notes(deployments)  # e.g. new replicas waiting for a node with a free GPU
            return Observation("Deploying", "Scaling", f"{counts}; {notes}" if notes else counts, replicas, ready)
        return Observation("Ready", "ApplicationRunning", counts, replicas, ready)
    return Observation("Degraded", "UnknownState", f"application status {app_status}: {message}", replicas, ready)


def observe_rayservice(rayservice: Mapping[str, Any] | None, app_name: str, replicas: int) -> Observation:
    """From a RayService's status. It has no per-replica counts, so ``ready_replicas`` is
    ``replicas`` once every Serve deployment is HEALTHY, else the cluster's ready worker pods
    (capped at ``replicas``)."""
    if rayservice is None:
        return Observation("Pending", "RayServiceMissing", "the RayService does not exist", replicas, 0)
    status = rayservice.get("status") or {}
    active = status.get("activeServiceStatus") or {}
    app = (active.get("applicationStatuses") or {}).get(app_name)
    if app is None:  # during a cluster upgrade the new application shows up as pending first
        app = ((status.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}).get(app_name)
    if app is None:
        return Observation("Deploying", "Deploying", "waiting for the Ray cluster and Serve", replicas, 0)
    deployments = app.get("serveDeploymentStatuses") or {}
    healthy = bool(deployments) and all(d.get("status") == "HEALTHY" for d in deployments.values())
    workers = (active.get("rayClusterStatus") or {}).get("readyWorkerReplicas") or 0
    ready = replicas if app.get("status") == "RUNNING" and healthy else min(workers, replicas)
    obs = _from_app_state(app.get("status"), app.get("message") or "", deployments, replicas, ready)
    return replace(obs, counted=False)


def observe_serve_application(details: Mapping[str, Any], app_name: str,
                              workers: Iterable[str] | None = None) -> Observation:
    """From the Serve REST API's ``GET /api/serve/applications/`` body. Replica counts add up the
    deployments named in ``workers`` (all of them when None)."""
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        return Observation("Pending", "ApplicationMissing", f"no application {app_name!r} on the Ray cluster")
    deployments = app.get("deployments") or {}
    counted = [d for name, d in deployments.items() if workers is None or name in set(workers)]
    replicas = sum(d.get("target_num_replicas") or 0 for d in counted)
    ready = sum(1 for d in counted for r in d.get("replicas") or [] if r.get("state") == "RUNNING")
    return _from_app_state(app.get("status"), app.get("message") or "", deployments, replicas, ready)


def _conditions(obs: Observation) -> list[dict[str, str]]:
    ready = obs.phase == "Ready" or (obs.phase == "Degraded" and obs.ready_replicas > 0)
    progressing = obs.phase in ("Pending", "Deploying")
    return [
        {"type": "Ready", "status": str(ready), "reason": obs.reason, "message": obs.message},
        {"type": "Progressing", "status": str(progressing), "reason": obs.reason, "message": obs.message},
        {"type": "Degraded", "status": str(obs.phase == "Degraded"), "reason": obs.reason, "message": obs.message},
    ]


def merge_conditions(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """``new`` conditions, each keeping its old ``lastTransitionTime`` unless its status changed."""
    before = {c.get("type"): c for c in old}
    merged = []
    for cond in new:
        prior = before.get(cond["type"])
        unchanged = prior is not None and prior.get("status") == cond["status"] and prior.get("lastTransitionTime")
        merged.append({**cond, "lastTransitionTime": prior["lastTransitionTime"] if unchanged else now})
    return merged


def rfc3339(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return rfc3339(datetime.datetime.now(datetime.timezone.utc).timestamp())


def status_fields(current: Mapping[str, Any], obs: Observation, generation: int | None,
                  endpoint: str | None, now: str) -> dict[str, Any]:
    """The status a ModelDeployment should have after ``obs``, given its ``current`` status."""
    return {
        "observedGeneration": generation,
        "phase": obs.phase,
        "replicas": obs.replicas,
        "readyReplicas": obs.ready_replicas,
        "endpoint": endpoint,
        "conditions": merge_conditions(current.get("conditions") or [], _conditions(obs), now),
    }


def changed(current: Mapping[str, Any], fields: Mapping[str, Any]) -> bool:
    """Whether writing ``fields`` would change ``current`` (so a steady state writes nothing)."""
    return any(current.get(k) != v for k, v in fields.items())
