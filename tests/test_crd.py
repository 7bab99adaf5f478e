"""The ModelDeployment CRD: a valid Kubernetes object whose schema and CEL rules accept the examples
and reject each invalid spec by the constraint meant for it; its defaults agree with parse_spec's."""

from __future__ import annotations

import copy
import os

import pytest

from kubeinfer.operator.spec import parse_spec
from tests.k8s_schema import ROOT, apply_defaults, cel_failures, crd_schema, k8s_errors, load_yaml_docs, schema_errors

CRD_PATH = os.path.join(ROOT, "manifests", "crd.yaml")
EXAMPLES = os.path.join(ROOT, "manifests", "examples")
SCHEMA = crd_schema(CRD_PATH, "v1alpha1")


def _md(spec: dict, name: str = "demo") -> dict:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def _judge(obj: dict) -> tuple[list, list]:
    """What the API server would say: schema errors, then CEL failures on the defaulted object."""
    defaulted = apply_defaults(SCHEMA, obj)
    errors = schema_errors(SCHEMA, defaulted)
    return errors, ([] if errors else cel_failures(SCHEMA, defaulted))


def test_crd_is_a_valid_kubernetes_object_with_the_agreed_names():
    (crd,) = load_yaml_docs(CRD_PATH)
    assert k8s_errors(crd) is None
    names = crd["spec"]["names"]
    assert (crd["spec"]["group"], names["kind"], names["plural"], names["shortNames"]) == \
        ("kubeinfer.io", "ModelDeployment", "modeldeployments", ["md"])
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                                "statusReplicasPath": ".status.replicas"}
    assert "status" in version["subresources"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": ".status.phase", "Ready": ".status.readyReplicas", "Desired": ".status.replicas",
                       "Model": ".spec.model.uri", "Endpoint": ".status.endpoint",
                       "Policy": ".status.autoscaling.policy", "Last-Decision": ".status.autoscaling.lastDecision",
                       "Age": ".metadata.creationTimestamp"}
    # The autoscaling columns are -o wide only, and name fields the status schema has.
    wide = {c["name"] for c in version["additionalPrinterColumns"] if c.get("priority") == 1}
    assert wide == {"Policy", "Last-Decision"}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["autoscaling"]["properties"]
    assert {"policy", "lastDecision"} <= set(status)


def test_chart_crd_is_the_same_file():
    chart_crd = os.path.join(ROOT, "helm", "kubeinfer", "crds", "modeldeployments.kubeinfer.io.yaml")
    with open(CRD_PATH, "rb") as a, open(chart_crd, "rb") as b:
        assert a.read() == b.read(), "helm/kubeinfer/crds/ must be a copy of manifests/crd.yaml"


@pytest.mark.parametrize("name", sorted(os.listdir(EXAMPLES)))
def test_examples_are_accepted_and_parse(name):
    (doc,) = load_yaml_docs(os.path.join(EXAMPLES, name))
    assert _judge(doc) == ([], [])
    assert parse_spec(apply_defaults(SCHEMA, doc)) == parse_spec(doc)


@pytest.mark.parametrize("spec", [{}, {"autoscaling": {"maxReplicas": 3}}, {"resources": {"gpus": 1}},
                                  {"autoscaling": {"maxReplicas": 3, "policy": "latency", "ttftSeconds": 0.5}}])
def test_crd_defaults_equal_parse_spec_defaults(spec):
    """The operator fills in the same defaults as the API server (kmock and old CRDs apply none)."""
    obj = _md(spec)
    assert _judge(obj) == ([], [])
    assert parse_spec(apply_defaults(SCHEMA, obj)) == parse_spec(obj)


def test_status_as_the_operator_writes_it_is_accepted():
    obj = _md({})
    obj["status"] = {"observedGeneration": 2, "phase": "Ready", "replicas": 1, "readyReplicas": 1,
                     "endpoint": "demo.default.svc:9000",
                     "autoscaling": {"policy": "kvCache", "lastScale": "2 -> 3", "lastScaleTime": "2026-01-01T00:00:00Z"},
                     "conditions": [{"type": "Ready", "status": "True", "reason": "ReplicasReady",
                                     "message": "1/1 replicas ready", "lastTransitionTime": "2026-01-01T00:00:00Z",
                                     "observedGeneration": 2}],
                     "kopf": {"progress": {}}}
    assert _judge(obj) == ([], [])


# Each invalid spec and the one constraint that must reject it: ("schema", path, keyword) or
# ("cel", path, message fragment).
INVALID = {
    "unknown quantization": ({"model": {"quantization": "fp8"}}, ("schema", "spec.model.quantization", "enum")),
    "unknown router policy": ({"router": {"policy": "random"}}, ("schema", "spec.router.policy", "enum")),
    "negative replicas": ({"replicas": -1}, ("schema", "spec.replicas", "minimum")),
    "unknown field": ({"modle": {}}, ("schema", "spec", "additionalProperties")),
    "unknown engine field": ({"engine": {"blockSize": 16}}, ("schema", "spec.engine", "additionalProperties")),
    "odd block size": ({"engine": {"kvBlockSize": 12}}, ("schema", "spec.engine.kvBlockSize", "enum")),
    "two GPUs": ({"resources": {"gpus": 2}}, ("schema", "spec.resources.gpus", "maximum")),
    "memory not a quantity": ({"resources": {"memory": "lots"}}, ("schema", "spec.resources.memory", "pattern")),
    "zero target": ({"autoscaling": {"maxReplicas": 2, "targetOngoingRequests": 0}},
                    ("schema", "spec.autoscaling.targetOngoingRequests", "minimum")),
    "autoscaling without max": ({"autoscaling": {"minReplicas": 1}}, ("schema", "spec.autoscaling", "required")),
    "rayAddress not a url": ({"rayAddress": "ray-head:8265"}, ("schema", "spec.rayAddress", "pattern")),
    "replicas and autoscaling": ({"replicas": 2, "autoscaling": {"maxReplicas": 3}},
                                 ("cel", "spec", "not both")),
    "min above max": ({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}},
                      ("cel", "spec.autoscaling", "minReplicas must be <= maxReplicas")),
    "initial above max": ({"autoscaling": {"maxReplicas": 2, "initialReplicas": 3}},
                          ("cel", "spec.autoscaling", "initialReplicas")),
    "zero delay without zero min": ({"autoscaling": {"maxReplicas": 2, "downscaleToZeroDelaySeconds": 60}},
                                    ("cel", "spec.autoscaling", "needs minReplicas: 0")),
    "unknown autoscaling policy": ({"autoscaling": {"maxReplicas": 2, "policy": "cpu"}},
                                   ("schema", "spec.autoscaling.policy", "enum")),
    "KV target above 1": ({"autoscaling": {"maxReplicas": 2, "policy": "kvCache", "targetKvCacheUsage": 1.2}},
                          ("schema", "spec.autoscaling.targetKvCacheUsage", "maximum")),
    "KV target of 0": ({"autoscaling": {"maxReplicas": 2, "policy": "kvCache", "targetKvCacheUsage": 0}},
                       ("schema", "spec.autoscaling.targetKvCacheUsage", "minimum")),
    "TTFT SLO of 0": ({"autoscaling": {"maxReplicas": 2, "policy": "latency", "ttftSeconds": 0}},
                      ("schema", "spec.autoscaling.ttftSeconds", "minimum")),
    "policy target without autoscaling": ({"targetKvCacheUsage": 0.7}, ("schema", "spec", "additionalProperties")),
    "KV target for the queue policy": ({"autoscaling": {"maxReplicas": 2, "policy": "queue", "targetKvCacheUsage": 0.5}},
                                       ("cel", "spec.autoscaling", "targetKvCacheUsage needs policy: kvCache")),
    "TTFT SLO for the default policy": ({"autoscaling": {"maxReplicas": 2, "ttftSeconds": 1}},
                                        ("cel", "spec.autoscaling", "ttftSeconds needs policy: latency")),
    "unknown uri scheme": ({"model": {"uri": "s3://bucket/model"}}, ("cel", "spec.model", "builtin://NAME")),
    "no chunked prefill, small batch": ({"engine": {"chunkedPrefill": False, "maxNumBatchedTokens": 512}},
                                        ("cel", "spec", "maxNumBatchedTokens >= model.maxModelLen")),
    "no GPU memory to use": ({"engine": {"gpuMemoryUtilization": 0}},
                             ("schema", "spec.engine.gpuMemoryUtilization", "minimum")),
    "more GPU memory than there is": ({"engine": {"gpuMemoryUtilization": 1.2}},
                                      ("schema", "spec.engine.gpuMemoryUtilization", "maximum")),
    "enforceEager not a boolean": ({"engine": {"enforceEager": "yes"}},
                                   ("schema", "spec.engine.enforceEager", "type")),
    "speculative not a block": ({"engine": {"speculative": "ngram"}}, ("schema", "spec.engine.speculative", "type")),
    "unknown speculative method": ({"engine": {"speculative": {"method": "medusa"}}},
                                   ("schema", "spec.engine.speculative.method", "enum")),
    "zero speculative tokens": ({"engine": {"speculative": {"numSpeculativeTokens": 0}}},
                                ("schema", "spec.engine.speculative.numSpeculativeTokens", "minimum")),
    "speculative field in the engine block": ({"engine": {"speculativeMethod": "ngram"}},
                                              ("schema", "spec.engine", "additionalProperties")),
    "n-gram bounds crossed": ({"engine": {"speculative": {"method": "ngram", "promptLookupMin": 5}}},
                              ("cel", "spec.engine.speculative", "promptLookupMax must be >= promptLookupMin")),
    "draft model without method draft": ({"engine": {"speculative": {"method": "ngram", "draftModel": "pvc://m/d"}}},
                                         ("cel", "spec.engine.speculative", "draftModel needs method: draft")),
    "draft model not a uri": ({"engine": {"speculative": {"method": "draft", "draftModel": "/models/d"}}},
                              ("cel", "spec.engine.speculative", "must be builtin://NAME")),
    "gpuMemory without GPU": ({"resources": {"gpuMemory": "16Gi"}}, ("cel", "spec.resources", "needs gpus: 1")),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_spec_is_rejected_by_its_constraint(case):
    spec, (kind, path, what) = INVALID[case]
    errors, failures = _judge(_md(copy.deepcopy(spec)))
    if kind == "schema":
        assert errors == [(path, what)]
    else:
        assert errors == []
        assert len(failures) == 1 and failures[0][0] == path and what in failures[0][1], failures


def test_long_name_is_rejected_by_the_root_rule():
    errors, failures = _judge(_md({}, name="a" * 41))
    assert errors == [] and failures == [("", failures[0][1])] and "40" in failures[0][1]


def _documented_fields() -> dict[str, set[str]]:
    """docs/crd.md's field tables: the section (``spec.model``, ...) -> the names in its rows."""
    tables: dict[str, set[str]] = {}
    section = ""
    with open(os.path.join(ROOT, "docs", "crd.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):  # "## spec.engine", "## Scaling: spec.replicas or spec.autoscaling"
                words = line[3:].split()
                section = next((w for w in reversed(words) if w.startswith("spec.")), words[0])
            elif line.startswith("| `"):
                tables.setdefault(section, set()).add(line.split("`")[1])
    return tables


def test_docs_describe_every_field_of_the_crd():
    """docs/crd.md has a table row for each field of each spec section, and names no field the CRD lacks."""
    spec = SCHEMA["properties"]["spec"]["properties"]
    tables = _documented_fields()
    for name in ("model", "engine", "resources", "router", "autoscaling"):
        assert set(tables[f"spec.{name}"]) == set(spec[name]["properties"]), name
    assert set(tables["spec.engine.speculative"]) == set(spec["engine"]["properties"]["speculative"]["properties"])
    scalars = {k for k, v in spec.items() if v.get("type") != "object" and k != "replicas"}
    assert scalars <= tables["Placement"]
