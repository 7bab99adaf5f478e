"""Test helpers that judge objects the way a kube-apiserver would, without one: a CRD's structural
schema (defaults, then OpenAPI validation) and its CEL rules (``x-kubernetes-validations``)."""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from typing import Any, Iterator

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
KUBERAY_CRD = os.path.join(SHARED, "kuberay", "ray.io_rayservices.yaml")
K8S_VERSION = "1.37.0"


def load_yaml_docs(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def crd_schema(path: str, version: str) -> dict[str, Any]:
    """``spec.versions[name == version].schema.openAPIV3Schema`` of the CRD in ``path``."""
    (crd,) = [d for d in load_yaml_docs(path) if d.get("kind") == "CustomResourceDefinition"]
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return found["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """A copy of ``obj`` with the schema's ``default``s filled in, as the API server does (a defaulted
    object gets its own nested defaults)."""
    obj = copy.deepcopy(obj)
    _default(schema, obj)
    return obj


def _default(schema: dict[str, Any], obj: Any) -> None:
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                _default(sub, obj[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in obj.items():
                if name not in schema.get("properties", {}):
                    _default(extra, value)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            _default(schema["items"], item)


def schema_errors(schema: dict[str, Any], obj: Any) -> list[tuple[str, str]]:
    """OpenAPI violations as (dotted path, JSON-schema keyword). Kubernetes' schemas are OpenAPI 3.0,
    i.e. draft 4 semantics (boolean exclusiveMinimum); ``x-kubernetes-*`` keys are annotations."""
    validator = jsonschema.Draft4Validator(schema)
    return sorted((".".join(str(p) for p in e.absolute_path), e.validator) for e in validator.iter_errors(obj))


@lru_cache(maxsize=None)
def _compiled(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _rules(schema: dict[str, Any], obj: Any, path: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, obj
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                yield from _rules(sub, obj[name], f"{path}.{name}" if path else name)
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            yield from _rules(schema["items"], item, f"{path}[{i}]")


def cel_failures(schema: dict[str, Any], obj: Any) -> list[tuple[str, str]]:
    """Every ``x-kubernetes-validations`` rule evaluated with ``self`` bound to its node: the failing
    ones as (path of the node, the rule's message)."""
    failed = []
    for path, rule, node in _rules(schema, obj, ""):
        result = _compiled(rule["rule"]).evaluate({"self": celpy.json_to_cel(node)})
        if isinstance(result, Exception) or not bool(result):
            failed.append((path, rule.get("message", rule["rule"])))
    return failed


def k8s_errors(obj: dict[str, Any]) -> str | None:
    """kubernetes-validate (strict: unknown fields are errors) against Kubernetes ``K8S_VERSION``:
    None when valid, else the first line of the complaint."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}"
    return None
