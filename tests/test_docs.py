"""README.md and docs/ stay true about the repository: every file they name by its path from the
repository root exists, and the example names they use are the examples' own."""

from __future__ import annotations

import pathlib
import re

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("kubeinfer/", "tests/", "benchmarks/", "docs/", "manifests/", "helm/", "scripts/", "proto/")
PATH = re.compile(r"`((?:%s)[A-Za-z0-9_./-]+)`" % "|".join(map(re.escape, TOP_DIRS)))


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        for path in PATH.findall(doc.read_text()):
            if not (ROOT / path.rstrip("/")).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, missing


def test_kubectl_commands_name_the_examples_resources():
    names = {doc["metadata"]["name"] for f in (ROOT / "manifests" / "examples").glob("*.yaml")
             for doc in yaml.safe_load_all(f.read_text()) if doc and doc.get("kind") == "ModelDeployment"}
    used = []
    for doc in DOCS:
        used += [(doc.name, n) for n in re.findall(r"kubectl scale (?:md|modeldeployment) ([a-z0-9-]+)", doc.read_text())
                 if n != "NAME"]
    assert used, "the docs show kubectl scale"
    assert [(d, n) for d, n in used if n not in names] == [], names
