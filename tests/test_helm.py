"""The Helm chart: lints clean with a real helm, renders valid Kubernetes objects (cluster-wide and
single-namespace RBAC), hardened; its CRD and images are the ones the manifests and renderer use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from kubeinfer.operator.render import OPERATOR_IMAGE, WORKER_IMAGE, WORKER_IMAGE_CUDA
from tests.k8s_schema import ROOT, k8s_errors, load_yaml_docs

CHART = os.path.join(ROOT, "helm", "kubeinfer")


def _helm() -> str:
    local = os.path.join(ROOT, ".venv", "bin", "helm")
    found = local if os.access(local, os.X_OK) else shutil.which("helm")
    if found is None:
        pytest.skip("no helm at .venv/bin/helm or on PATH (`make .venv/bin/helm` installs it)")
    return found


def _run(*args: str) -> str:
    done = subprocess.run([_helm(), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def _template(*sets: str, namespace: str = "kubeinfer-system") -> list[dict]:
    args = ["template", "kubeinfer", CHART, "--namespace", namespace, "--include-crds"]
    for s in sets:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(_run(*args)) if d]


def _by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_helm_lint_is_clean():
    out = _run("lint", "--strict", CHART)
    assert "0 chart(s) failed" in out
    assert not re.search(r"\[(WARNING|ERROR)\]", out), out


@pytest.mark.parametrize("sets", [(), ("rbac.namespaced=true",), ("watchNamespace=models",)],
                         ids=["cluster-wide", "namespaced", "watch-namespace"])
def test_every_rendered_object_is_valid_kubernetes(sets):
    docs = _template(*sets)
    assert {d["kind"] for d in docs} >= {"CustomResourceDefinition", "ServiceAccount", "Deployment"}
    assert [k8s_errors(d) for d in docs] == [None] * len(docs)


def test_cluster_wide_rbac_by_default():
    kinds = _by_kind(_template())
    assert "Role" not in kinds and len(kinds["ClusterRole"]) == len(kinds["ClusterRoleBinding"]) == 1
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)
    rules = {(g, r) for rule in kinds["ClusterRole"][0]["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("kubeinfer.io", "modeldeployments"), ("kubeinfer.io", "modeldeployments/status"),
            ("kubeinfer.io", "modeldeployments/finalizers"), ("ray.io", "rayservices"), ("", "services"),
            ("", "events"), ("events.k8s.io", "events"), ("", "namespaces"),
            ("apiextensions.k8s.io", "customresourcedefinitions")} <= rules


@pytest.mark.parametrize("sets,namespace", [(("rbac.namespaced=true",), "kubeinfer-system"),
                                            (("watchNamespace=models",), "models")])
def test_namespaced_rbac_is_a_role_in_the_watched_namespace(sets, namespace):
    kinds = _by_kind(_template(*sets))
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    (role,), (binding,) = kinds["Role"], kinds["RoleBinding"]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert binding["subjects"][0]["namespace"] == "kubeinfer-system"
    args = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--namespace={namespace}" in args and "--all-namespaces" not in args


def test_operator_pod_is_hardened_and_probed():
    (deployment,) = _by_kind(_template())["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["resources"]["limits"] and container["resources"]["requests"]


def test_chart_crd_equals_the_manifest_crd():
    (chart_crd,) = [d for d in _template() if d["kind"] == "CustomResourceDefinition"]
    (manifest_crd,) = load_yaml_docs(os.path.join(ROOT, "manifests", "crd.yaml"))
    assert chart_crd == manifest_crd


def test_chart_images_are_the_renderers():
    with open(os.path.join(CHART, "values.yaml"), encoding="utf-8") as f:
        values = yaml.safe_load(f)
    assert f"{values['image']['repository']}:{values['image']['tag']}" == OPERATOR_IMAGE
    assert values["workerImages"] == {"cpu": WORKER_IMAGE, "cuda": WORKER_IMAGE_CUDA}
    (deployment,) = _by_kind(_template())["Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == OPERATOR_IMAGE
    (manifest,) = [d for d in load_yaml_docs(os.path.join(ROOT, "manifests", "operator.yaml"))
                   if d["kind"] == "Deployment"]
    assert manifest["spec"]["template"]["spec"]["containers"][0]["image"] == OPERATOR_IMAGE


def test_every_value_is_documented():
    """Each value in values.yaml has a comment right above it. A key without one must be a section
    (a block whose own keys are documented); the contents of a documented value need no more."""
    with open(os.path.join(CHART, "values.yaml"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    undocumented, covered_below = [], None  # indent under which lines belong to a documented value
    for i, line in enumerate(lines):
        key = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if not key:
            continue
        indent = len(key.group(1))
        if covered_below is not None and indent > covered_below:
            continue
        covered_below = None
        if i and lines[i - 1].strip().startswith("#"):
            covered_below = indent
        elif key.group(3).strip():  # a leaf with no comment
            undocumented.append(line.strip())
    assert undocumented == []


def test_manifests_grant_what_the_chart_grants():
    (chart_role,) = _by_kind(_template())["ClusterRole"]
    (manifest_role,) = [d for d in load_yaml_docs(os.path.join(ROOT, "manifests", "rbac.yaml"))
                        if d["kind"] == "ClusterRole"]
    assert manifest_role["rules"] == chart_role["rules"]
