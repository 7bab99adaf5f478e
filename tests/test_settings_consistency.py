"""Engine settings have one definition, EngineConfig: every command's engine flags, the CRD's
``spec.engine`` (and the engine fields of ``spec.model``), docs/crd.md and the operator's parser agree
with it. A field added to EngineConfig and not to the CRD and its docs (or the other way round) fails
here, unless kubeinfer.worker.config names it, with the reason, in NOT_IN_CRD / NOT_ON_COMMAND_LINE."""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import Field, fields
from typing import Any

import pytest

from kubeinfer.cli import build_parser, engine_flag
from kubeinfer.operator.spec import ENGINE_FIELDS, deployment_default, parse_spec, to_app_config
from kubeinfer.worker.config import (COMMAND_LINE_DEFAULTS, DEPLOYMENT_DEFAULTS, NOT_IN_CRD, NOT_ON_COMMAND_LINE,
                                     EngineConfig)
from tests.k8s_schema import ROOT, crd_schema

CRD_PATH = os.path.join(ROOT, "manifests", "crd.yaml")
SPEC = crd_schema(CRD_PATH, "v1alpha1")["properties"]["spec"]
# A ModelDeployment's spelling of a default where EngineConfig says None: the same setting.
CRD_SPELLING_OF_NONE = {"model": "builtin://smollm2-135m", "quantization": "none", "speculative_method": "none"}
# The commands that build an engine, as argv prefixes.
COMMANDS = {"generate": ["generate", "x"], "serve": ["serve"], "bench": ["bench"], "eval ppl": ["eval", "ppl"]}
_JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string"}


def engine_fields() -> dict[str, Field]:
    return {f.name: f for f in fields(EngineConfig)}


def crd_path(f: Field) -> str | None:
    return f.metadata.get("crd")


# --- EngineConfig itself ---------------------------------------------------------------------------


def test_every_field_says_what_it_is_and_where_it_is_exposed():
    for name, f in engine_fields().items():
        assert f.metadata.get("help"), f"EngineConfig.{name} has no help text"
        # Exactly one of: a CRD field, or a named reason not to be one.
        assert (crd_path(f) is None) == (name in NOT_IN_CRD), name
    for allow_list in (NOT_IN_CRD, NOT_ON_COMMAND_LINE):
        assert set(allow_list) <= set(engine_fields()) and all(allow_list.values()), allow_list
    assert set(COMMAND_LINE_DEFAULTS) | set(DEPLOYMENT_DEFAULTS) <= set(engine_fields())


def test_none_is_a_quantization_everywhere():
    assert EngineConfig(quantization="none").quantization is None
    args = build_parser().parse_args(["generate", "x", "--quantization", "none"])
    assert args.quantization is None
    assert parse_spec({"metadata": {"name": "a"}, "spec": {"model": {"quantization": "none"}}}).model.quantization \
        is None


def test_serve_passes_every_engine_setting_to_its_replicas():
    """ModelSpec (the Serve config) takes every EngineConfig field but the three it holds itself."""
    from kubeinfer.serve.config import ENGINE_KEYS
    assert set(ENGINE_KEYS) == set(engine_fields()) - {"model", "quantization", "max_model_len"}


# --- the command line ------------------------------------------------------------------------------


def _engine_actions(argv: list[str]) -> dict[str, argparse.Action]:
    """The engine flags of the subcommand ``argv`` names, by option string."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]  # noqa: SLF001 (argparse has no public accessor)
    for word in argv[:-1] if argv[0] == "generate" else argv:
        parser = sub.choices[word]
        if parser._subparsers is not None:
            sub = parser._subparsers._group_actions[0]
    (group,) = [g for g in parser._action_groups if g.title.startswith("engine settings")]
    return {opt: action for action in group._group_actions for opt in action.option_strings}


def command_line_problems() -> list[str]:
    problems = []
    expected = {engine_flag(f): f for f in fields(EngineConfig) if f.name not in NOT_ON_COMMAND_LINE}
    for command, argv in COMMANDS.items():
        actions = _engine_actions(argv)
        for flag in sorted(set(expected) - set(actions)):
            problems.append(f"{command}: no {flag}")
        for flag in sorted(set(actions) - set(expected)):
            problems.append(f"{command}: {flag} is no EngineConfig field's, or one NOT_ON_COMMAND_LINE")
        for flag in sorted(set(actions) & set(expected)):
            f, action = expected[flag], actions[flag]
            default = False if f.type == "bool" else COMMAND_LINE_DEFAULTS.get(f.name, f.default)
            if action.default != default:
                problems.append(f"{command}: {flag} defaults to {action.default!r}, EngineConfig to {default!r}")
            choices = f.metadata.get("choices")
            if choices and not (action.choices == choices or action.metavar == "{" + ",".join(choices) + "}"):
                problems.append(f"{command}: {flag} takes {action.choices}, EngineConfig {choices}")
    return problems


def test_every_command_has_every_engine_flag_at_engine_config_defaults():
    assert command_line_problems() == []


def test_the_command_line_check_can_fail(monkeypatch):
    monkeypatch.setitem(globals(), "COMMAND_LINE_DEFAULTS", {**COMMAND_LINE_DEFAULTS, "max_num_seqs": 16})
    assert sorted(p.partition(":")[0] for p in command_line_problems() if "--max-num-seqs defaults" in p) == \
        sorted(COMMANDS)


def test_serve_help_lists_every_engine_setting_generate_lists_with_the_same_defaults():
    generate, serve = (_engine_actions(COMMANDS[c]) for c in ("generate", "serve"))
    assert {k: a.default for k, a in serve.items()} == {k: a.default for k, a in generate.items()}
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # noqa: SLF001
    for flag in generate:
        assert flag in help_text


def test_documented_flags_still_parse():
    """The engine flags README.md names (users type them) keep working."""
    argv = ["generate", "x", "--device", "cpu", "--dtype", "bfloat16", "--quantization", "int4", "--group-size",
            "64", "--kv-cache-dtype", "int8", "--max-model-len", "512", "--kv-cache-memory-gb", "0.5",
            "--gpu-memory-utilization", "0.5", "--max-num-seqs", "4", "--max-num-batched-tokens", "128",
            "--no-prefix-caching", "--threads", "2", "--kernel-backend", "torch", "--enforce-eager", "--compile"]
    from kubeinfer.cli import engine_config_from_args
    config = engine_config_from_args(build_parser().parse_args(argv))
    assert (config.quantization_group_size, config.num_threads, config.enable_prefix_caching,
            config.kv_cache_memory_bytes, config.compile) == (64, 2, False, 1 << 29, True)


# --- the CRD and docs/crd.md ----------------------------------------------------------------------


def _doc_tables() -> dict[str, dict[str, str]]:
    """docs/crd.md's field tables: section (``spec.engine``) -> field -> its Default cell."""
    tables: dict[str, dict[str, str]] = {}
    section = ""
    with open(os.path.join(ROOT, "docs", "crd.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("| `"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                tables.setdefault(section, {})[cells[0].strip("`")] = cells[1]
    return tables


def _literal(value: Any) -> str:
    return {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _schema_at(spec_schema: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The schema of ``spec.<path>`` (``engine.speculative.method``), None where the CRD has no such field."""
    node: dict[str, Any] | None = spec_schema
    for part in path.split("."):
        node = (node or {}).get("properties", {}).get(part)
    return node


def _blocks(schema: dict[str, Any], path: str) -> dict[str, dict[str, Any]]:
    """Every object under ``spec.<path>`` with properties of its own, by path (``engine``, ``engine.speculative``)."""
    found = {path: schema}
    for key, prop in schema["properties"].items():
        if prop.get("type") == "object" and "properties" in prop:
            found.update(_blocks(prop, f"{path}.{key}"))
    return found


def crd_problems(spec_schema: dict[str, Any], doc_tables: dict[str, dict[str, str]]) -> list[str]:
    problems = []
    mapped = {crd_path(f): f for f in fields(EngineConfig) if crd_path(f)}
    blocks = _blocks(spec_schema["properties"]["engine"], "engine")
    for block, schema in blocks.items():
        props = schema["properties"]
        leaves = {k for k in props if f"{block}.{k}" not in blocks}
        for key in sorted(leaves - {p.rpartition(".")[2] for p in mapped if p.rpartition(".")[0] == block}):
            problems.append(f"spec.{block}.{key} is in the CRD but no EngineConfig field's crd")
        if set(doc_tables.get(f"spec.{block}", {})) != set(props):
            problems.append(f"docs/crd.md's spec.{block} rows {sorted(doc_tables.get(f'spec.{block}', {}))} are "
                            f"not the CRD's {sorted(props)}")
    for path, f in sorted(mapped.items()):
        section, _, key = path.rpartition(".")
        prop = _schema_at(spec_schema, path)
        if prop is None:
            problems.append(f"EngineConfig.{f.name}: spec.{path} is not in the CRD")
            continue
        default = deployment_default(f)
        want = CRD_SPELLING_OF_NONE.get(f.name) if default is None else default
        if prop.get("default") != want:
            problems.append(f"spec.{path} defaults to {prop.get('default')!r}, EngineConfig (deployment) to {want!r}")
        kind = f.type.replace(" | None", "")
        if f.name.endswith("_bytes"):
            if not prop.get("x-kubernetes-int-or-string"):
                problems.append(f"spec.{path} should take a quantity (int-or-string)")
        elif prop.get("type") != _JSON_TYPES[kind]:
            problems.append(f"spec.{path} is {prop.get('type')}, EngineConfig.{f.name} {kind}")
        choices = f.metadata.get("choices")
        if choices and list(prop.get("enum", ())) != list(choices):
            problems.append(f"spec.{path} enum {prop.get('enum')} != EngineConfig.{f.name} choices {list(choices)}")
        cell = doc_tables.get(f"spec.{section}", {}).get(key)
        if cell is None:
            problems.append(f"docs/crd.md has no spec.{section} row for {key}")
        elif want is not None and cell != f"`{_literal(want)}`":
            problems.append(f"docs/crd.md says spec.{path} defaults to {cell}, not `{_literal(want)}`")
    return problems


def test_crd_and_docs_agree_with_engine_config():
    assert crd_problems(SPEC, _doc_tables()) == []


def test_the_crd_check_can_fail():
    """A field dropped from the CRD, one the engine does not have, a changed default and a missing doc row
    are each reported."""
    spec = copy.deepcopy(SPEC)
    engine = spec["properties"]["engine"]["properties"]
    del engine["compile"]
    engine["speculativeTokens"] = {"type": "integer", "default": 0}
    engine["maxNumSeqs"]["default"] = 64
    del engine["speculative"]["properties"]["promptLookupMin"]
    engine["speculative"]["properties"]["model"] = {"type": "string"}
    docs = _doc_tables()
    del docs["spec.model"]["maxModelLen"]
    del docs["spec.engine.speculative"]["method"]
    problems = crd_problems(spec, docs)
    assert any("speculativeTokens is in the CRD" in p for p in problems)
    assert any("spec.engine.speculative.model is in the CRD" in p for p in problems)
    assert any("spec.engine.speculative.promptLookupMin is not in the CRD" in p for p in problems)
    assert any("docs/crd.md's spec.engine.speculative rows" in p for p in problems)
    assert any("spec.engine.compile is not in the CRD" in p for p in problems)
    assert any("maxNumSeqs defaults to 64" in p for p in problems)
    assert any("no spec.model row for maxModelLen" in p for p in problems)


# --- the operator's parser ------------------------------------------------------------------------


def _non_default(f: Field) -> Any:
    """A valid value for spec.engine that is not the field's deployment default."""
    choices = f.metadata.get("choices")
    default = deployment_default(f)
    if choices:
        return next(c for c in choices if c not in (default, "none"))  # "none" is parsed as None
    return {"bool": not default, "int": (default or 0) + 1, "float": 0.5,
            "int | None": 256 << 20, "str | None": "file:///opt/models/a-model"}[f.type]


@pytest.mark.parametrize("gpus", [0, 1])
def test_every_crd_engine_field_reaches_the_engine_under_its_engine_config_name(gpus):
    spec: dict[str, Any] = {"engine": {}, "resources": {"gpus": gpus, "memory": "8Gi"}}
    values = {key: "256Mi" if f.name.endswith("_bytes") else _non_default(f) for key, f in ENGINE_FIELDS.items()}
    if not values["chunkedPrefill"]:
        values["maxNumBatchedTokens"] = 4096
    values["speculative.method"] = "draft"  # what a draftModel needs
    for key, value in values.items():  # "speculative.method" -> spec.engine.speculative.method
        *blocks, leaf = key.split(".")
        section = spec["engine"]
        for block in blocks:
            section = section.setdefault(block, {})
        section[leaf] = value
    parsed = parse_spec({"metadata": {"name": "a"}, "spec": spec})
    (model,) = to_app_config(parsed).models
    # Quantities become bytes and model uris the path the replica's pod sees them at.
    converted = {"kvCacheMemory": 256 << 20, "speculative.draftModel": "/opt/models/a-model"}
    for key, f in ENGINE_FIELDS.items():
        assert model.engine[f.name] == converted.get(key, values[key]), key
    if not gpus:  # what a CPU replica hands EngineConfig is accepted (a GPU one needs a GPU to resolve)
        assert EngineConfig(**model.replica_engine_kwargs()).block_size == spec["engine"]["kvBlockSize"]


def test_the_operator_reads_the_settings_without_torch():
    """The operator's image has no torch: EngineConfig's definitions and checks must import without it."""
    import subprocess
    import sys
    code = ("import sys; from kubeinfer.operator.render import build_rayservice; "
            "build_rayservice({'metadata': {'name': 'a', 'uid': 'u'}, "
            "'spec': {'model': {'quantization': 'int4'}, 'engine': {'maxNumSeqs': 8}}}); "
            "from kubeinfer.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
