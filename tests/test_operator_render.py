"""The operator's pure renderers, spec parsing and capacity check: CR fields land in the right Serve,
KubeRay and Kubernetes fields; what they render is valid for KubeRay's CRD and for Kubernetes; bad
specs fail with a message naming the field."""

from __future__ import annotations

import copy
import io
import os
from contextlib import redirect_stdout
from functools import lru_cache

import pytest
import yaml

from kubeinfer.cli import main
from kubeinfer.operator.capacity import RUNTIME_OVERHEAD_BYTES, estimate_capacity
from kubeinfer.operator.render import (OBJECT_STORE_BYTES, WORKER_IMAGE, WORKER_IMAGE_CUDA, build_rayservice,
                                       build_kuberay_serve_config, build_serve_config, build_service, render_objects, service_endpoint)
from kubeinfer.operator.spec import SpecError, parse_spec, to_app_config
from kubeinfer.serve.config import AppConfig
from tests.k8s_schema import KUBERAY_CRD, ROOT, crd_schema, k8s_errors, load_yaml_docs, schema_errors

EXAMPLES = os.path.join(ROOT, "manifests", "examples")
GIB = 1 << 30


def md(spec: dict | None = None, name: str = "demo", namespace: str = "ml") -> dict:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace, "uid": "u-1", "generation": 1}, "spec": spec or {}}


def example_bodies() -> list[dict]:
    return [load_yaml_docs(os.path.join(EXAMPLES, n))[0] for n in sorted(os.listdir(EXAMPLES))]


VARIANTS = {
    "default": {},
    "fixed": {"replicas": 3, "resources": {"cpu": "500m", "memory": "3Gi"}},
    "zero": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
    "gpu-pvc": {"model": {"uri": "pvc://weights/llama/1b"}, "resources": {"gpus": 1, "gpuMemory": "24Gi"},
                "nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
}


def _model(serve: dict) -> dict:
    (app,) = serve["applications"]
    (model,) = app["args"]["models"]
    return model


def _worker_group(rs: dict) -> dict:
    (group,) = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _containers(rs: dict) -> list[dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
            _worker_group(rs)["template"]["spec"]["containers"][0]]


# --- Serve config -----------------------------------------------------------------------------


def test_fixed_replicas_map_to_num_replicas_and_a_fixed_worker_group():
    body = md({"replicas": 3})
    model = _model(build_serve_config(body))
    assert (model["num_replicas"], model["autoscaling"]) == (3, None)
    rs = build_rayservice(body)
    group = _worker_group(rs)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False


def test_autoscaling_maps_one_to_one_onto_ray_serve_names():
    body = md({"autoscaling": {"minReplicas": 0, "maxReplicas": 5, "initialReplicas": 2, "targetOngoingRequests": 4,
                               "upscaleDelaySeconds": 7, "downscaleDelaySeconds": 90,
                               "downscaleToZeroDelaySeconds": 300}})
    model = _model(build_serve_config(body))
    assert model["num_replicas"] is None
    assert model["autoscaling"] == {"min_replicas": 0, "max_replicas": 5, "initial_replicas": 2,
                                    "target_ongoing_requests": 4, "upscale_delay_s": 7, "downscale_delay_s": 90,
                                    "downscale_to_zero_delay_s": 300}
    rs = build_rayservice(body)
    group = _worker_group(rs)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 0, 5)
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_autoscaling_defaults_and_scale_to_zero_start_at_min():
    model = _model(build_serve_config(md({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}})))
    assert model["autoscaling"] == {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2.0,
                                    "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    group = _worker_group(build_rayservice(md({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}})))
    assert (group["replicas"], group["minReplicas"]) == (0, 0)


def test_engine_router_and_model_fields_reach_the_application():
    body = md({"model": {"quantization": "int4", "maxModelLen": 1024, "name": "chat"},
               "engine": {"dtype": "bfloat16", "kvBlockSize": 32, "maxNumSeqs": 8, "maxNumBatchedTokens": 256,
                          "prefixCaching": False, "kvCacheDtype": "int8", "kvCacheMemory": "512Mi"},
               "router": {"policy": "prefix_affinity", "batchWindowMs": 2.5, "maxBatchSize": 4, "maxQueued": 10,
                          "maxInFlight": 20, "requestTimeoutSeconds": 30, "replicas": 2,
                          "maxCapacityWaitSeconds": 120, "maxN": 4}})
    serve = build_serve_config(body)
    model = _model(serve)
    assert (model["name"], model["uri"], model["quantization"], model["max_model_len"]) == \
        ("chat", "builtin://smollm2-135m", "int4", 1024)
    assert model["engine"] == {"device": "cpu", "dtype": "bfloat16", "kv_cache_dtype": "int8", "kernel_backend": "auto",
                               "block_size": 32, "max_num_seqs": 8, "max_num_batched_tokens": 256,
                               "enable_prefix_caching": False, "enable_chunked_prefill": True,
                               "kv_cache_memory_bytes": 512 << 20, "gpu_memory_utilization": 0.9,
                               "enforce_eager": False, "compile": False, "num_threads": 1,
                               "speculative_method": None, "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                               "prompt_lookup_max": 4, "speculative_disable_by_batch_size": 8,
                               "speculative_draft_quantization": "int4", "speculative_draft_model": None}
    assert serve["applications"][0]["args"]["router"] == {
        "policy": "prefix_affinity", "max_in_flight": 20, "max_queued": 10, "batch_window_ms": 2.5,
        "max_batch_size": 4, "request_timeout_s": 30, "num_replicas": 2, "max_queue_wait_s": 30.0,
        "max_prompt_chars": None, "max_body_bytes": None, "max_n": 4, "max_capacity_wait_s": 120}
    assert serve["applications"][0]["name"] == "ml.demo"  # Serve-API mode: namespace.name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_serve_config_round_trips_through_app_config(variant):
    args = build_serve_config(md(VARIANTS[variant]))["applications"][0]["args"]
    assert AppConfig.from_dict(copy.deepcopy(args)).to_dict() == args


def test_serve_api_mode_does_not_pin_replicas_to_worker_pods():
    """A plain Ray cluster has no kubeinfer_replica resource: requiring it would never schedule."""
    assert "resources" not in _model(build_serve_config(md()))["ray_actor_options"]
    rs_config = yaml.safe_load(build_rayservice(md())["spec"]["serveConfigV2"])
    assert _model(rs_config)["ray_actor_options"]["resources"] == {"kubeinfer_replica": 1}


# --- resources, images, volumes, placement ------------------------------------------------------


def test_cpu_resources_size_the_replica_and_its_worker_pod():
    body = md({"resources": {"cpu": "500m", "memory": "3Gi"}})
    actor = _model(build_serve_config(body))["ray_actor_options"]
    assert actor == {"num_cpus": 0.5, "memory": 3 * GIB}
    rs = build_rayservice(body)
    group = _worker_group(rs)
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": f"{(3 * GIB + OBJECT_STORE_BYTES) >> 20}Mi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    params = group["rayStartParams"]
    assert (params["num-cpus"], params["num-gpus"], params["memory"]) == ("1", "0", str(3 * GIB))
    assert params["resources"] == '"{\\"kubeinfer_replica\\": 1}"'
    assert container["image"] == WORKER_IMAGE


def test_a_gpu_is_requested_from_kubernetes_and_ray_alike():
    body = md({"resources": {"gpus": 1, "gpuMemory": "16Gi"}})
    assert _model(build_serve_config(body))["ray_actor_options"]["num_gpus"] == 1
    rs = build_rayservice(body)
    group = _worker_group(rs)
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert group["rayStartParams"]["num-gpus"] == "1"
    assert "num_threads" not in _model(build_serve_config(body))["engine"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert {c["image"] for c in _containers(rs)} == {WORKER_IMAGE_CUDA}
    assert {c["image"] for c in _containers(build_rayservice(md({"image": "me/worker:1"})))} == {"me/worker:1"}


def _pod_templates(rs: dict) -> dict[str, dict]:
    """Every pod template of a RayService, by group: the head (router, Serve controller) and each worker group."""
    cluster = rs["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


def test_a_pvc_model_is_mounted_read_only_in_every_pod_that_loads_it_or_its_tokenizer(tmp_path, capsys):
    """The workers load the weights and the head's router ingress loads the tokenizer, both from the
    Serve config's uri: every Ray pod mounts the claim there, read-only (`kubeinfer render`, as a user
    would run it), and the objects stay valid for Kubernetes and KubeRay."""
    path = tmp_path / "pvc.yaml"
    path.write_text(yaml.safe_dump(md({"model": {"uri": "pvc://weights/llama/1b/"},
                                       "autoscaling": {"minReplicas": 0, "maxReplicas": 2}})))
    assert main(["render", str(path)]) == 0
    rs, service = yaml.safe_load_all(capsys.readouterr().out)
    uri = _model(yaml.safe_load(rs["spec"]["serveConfigV2"]))["uri"]
    assert uri == "/models/weights/llama/1b"
    templates = _pod_templates(rs)
    assert set(templates) == {"head", "replica"}
    for group, template in templates.items():
        pod = template["spec"]
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} \
            in pod["volumes"], group
        for container in pod["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "model"]
            assert mount["readOnly"] is True and uri.startswith(mount["mountPath"] + "/"), group
        as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"demo-{group}"}, "spec": pod}
        assert k8s_errors(as_pod) is None
    assert k8s_errors(service) is None
    if os.path.exists(KUBERAY_CRD):
        assert schema_errors(_kuberay_schema(), rs) == []
    # Models that are not in a claim mount nothing extra.
    for body in (md(), md({"model": {"uri": "file:///opt/m.gguf"}})):
        for template in _pod_templates(build_rayservice(body)).values():
            assert [v["name"] for v in template["spec"]["volumes"]] == ["shm"]
    assert _model(build_serve_config(md({"model": {"uri": "file:///opt/m.gguf"}})))["uri"] == "/opt/m.gguf"
    assert _model(build_serve_config(md({"model": {"uri": "pvc://weights/m"}})))["name"] == "demo"


def test_a_draft_model_in_another_claim_is_mounted_beside_the_model():
    """speculative.draftModel: the engine gets the path in the pod; the draft's claim is mounted
    read-only (once, when it is the model's claim too); the capacity check says it cannot size it."""
    draft = {"method": "draft", "draftModel": "pvc://drafts/smol-135m"}
    body = md({"model": {"uri": "pvc://weights/llama/1b"}, "engine": {"speculative": draft}})
    model = _model(build_serve_config(body))
    assert model["engine"]["speculative_draft_model"] == "/models/drafts/smol-135m"
    for group, template in _pod_templates(build_rayservice(body)).items():
        pod = template["spec"]
        assert {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]} == \
            {"shm": None, "model": "weights", "draft": "drafts"}, group
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["draft"] == {"name": "draft", "mountPath": "/models/drafts", "readOnly": True}
        assert k8s_errors({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "d"}, "spec": pod}) is None
    same_claim = md({"model": {"uri": "pvc://weights/llama/1b"},
                     "engine": {"speculative": {"method": "draft", "draftModel": "pvc://weights/smol"}}})
    for template in _pod_templates(build_rayservice(same_claim)).values():
        assert [v["name"] for v in template["spec"]["volumes"]] == ["shm", "model"]
    estimate = estimate_capacity(parse_spec(body))
    assert estimate.fits is None and "speculative.draftModel" in estimate.message
    with pytest.raises(SpecError, match="spec.engine.speculative.draftModel needs speculative.method: draft"):
        parse_spec(md({"engine": {"speculative": {"method": "ngram", "draftModel": "file:///m"}}}))
    with pytest.raises(SpecError, match=r"spec.engine.speculative.draftModel 'pvc://drafts': name the model"):
        parse_spec(md({"engine": {"speculative": {"method": "draft", "draftModel": "pvc://drafts"}}}))


def test_placement_labels_and_hardening_apply_to_every_ray_pod():
    rs = build_rayservice(md(VARIANTS["gpu-pvc"]))
    cluster = rs["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]
        assert pod["metadata"]["labels"]["kubeinfer.io/model-deployment"] == "demo"
        assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
        assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        sc = pod["spec"]["containers"][0]["securityContext"]
        assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert rs["metadata"] == {"name": "demo", "namespace": "ml", "labels": rs["metadata"]["labels"]}
    assert rs["metadata"]["labels"]["app.kubernetes.io/instance"] == "demo"


def test_a_spec_change_changes_the_rendered_objects_and_nothing_else_does():
    before = build_rayservice(md({"replicas": 1}))
    assert build_rayservice(md({"replicas": 1})) == before
    after = build_rayservice(md({"replicas": 1, "engine": {"maxNumSeqs": 32}}))
    assert after["metadata"] == before["metadata"]
    assert after["spec"]["serveConfigV2"] != before["spec"]["serveConfigV2"]
    assert "max_num_seqs: 32" in after["spec"]["serveConfigV2"]
    scaled = build_rayservice(md({"replicas": 4}))
    assert _worker_group(scaled)["replicas"] == 4


# --- Service --------------------------------------------------------------------------------------


def test_service_selects_the_healthy_serve_pods_and_exposes_grpc_and_http():
    svc = build_service(md())
    assert svc["metadata"]["name"] == "demo" and svc["metadata"]["namespace"] == "ml"
    assert svc["spec"]["selector"] == {"kubeinfer.io/model-deployment": "demo", "ray.io/serve": "true"}
    assert {(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == \
        {("grpc", 9000, "grpc"), ("http", 8000, "serve")}
    ports = {p["name"] for c in _containers(build_rayservice(md())) for p in c["ports"]}
    assert {"grpc", "serve"} <= ports  # the Service's named target ports exist on the pods
    assert service_endpoint(parse_spec(md())) == "demo.ml.svc:9000"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_service_is_valid_kubernetes(variant):
    assert k8s_errors(build_service(md(VARIANTS[variant]))) is None


# --- validity against KubeRay's CRD ------------------------------------------------------------------


@lru_cache(maxsize=1)
def _kuberay_schema() -> dict:
    return crd_schema(KUBERAY_CRD, "v1")


def _bodies() -> list[tuple[str, dict]]:
    return [(f"variant-{k}", md(v)) for k, v in sorted(VARIANTS.items())] + \
        [(f"example-{b['metadata']['name']}", b) for b in example_bodies()]


@pytest.mark.parametrize("label,body", _bodies(), ids=[label for label, _ in _bodies()])
def test_rayservice_is_valid_for_kuberay(label, body):
    if not os.path.exists(KUBERAY_CRD):
        pytest.skip(f"KubeRay's RayService CRD is not at {KUBERAY_CRD} (../shared missing)")
    rs = build_rayservice(body)
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == build_kuberay_serve_config(body)
    assert schema_errors(_kuberay_schema(), rs) == []


def test_kuberay_schema_check_can_fail():
    if not os.path.exists(KUBERAY_CRD):
        pytest.skip(f"KubeRay's RayService CRD is not at {KUBERAY_CRD} (../shared missing)")
    rs = build_rayservice(md())
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "three"
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 1
    assert len(schema_errors(_kuberay_schema(), rs)) == 2


# --- bad specs ---------------------------------------------------------------------------------------

BAD_SPECS = {
    "s3 uri": ({"model": {"uri": "s3://bucket/m"}}, "unsupported scheme"),
    "unknown builtin": ({"model": {"uri": "builtin://llama-70b"}}, "no builtin model 'llama-70b'"),
    "pvc without path": ({"model": {"uri": "pvc://weights"}}, "name the model's folder or file inside the claim"),
    "relative file uri": ({"model": {"uri": "file://models/m"}}, "absolute path"),
    "context too long": ({"model": {"maxModelLen": 9000}}, "exceeds the model's context length 8192"),
    "both scalings": ({"replicas": 1, "autoscaling": {"maxReplicas": 2}}, "not both"),
    "min above max": ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas <= maxReplicas"),
    "utilization zero": ({"engine": {"gpuMemoryUtilization": 0}}, "spec.engine.gpuMemoryUtilization must be in (0, 1]"),
    "no sequences": ({"engine": {"maxNumSeqs": 0}}, "spec.engine.maxNumSeqs must be >= 1, got 0"),
    "odd block size": ({"engine": {"kvBlockSize": 12}}, "spec.engine.kvBlockSize must be one of 8, 16"),
    "unknown kernels": ({"engine": {"kernelBackend": "cuda"}}, "spec.engine.kernelBackend must be one of auto"),
    "compile not a bool": ({"engine": {"compile": 1}}, "spec.engine.compile must be true or false, got 1"),
    "seqs not an integer": ({"engine": {"maxNumSeqs": "8"}}, "spec.engine.maxNumSeqs must be an integer"),
    "utilization above one": ({"engine": {"gpuMemoryUtilization": 1.5}}, "gpuMemoryUtilization"),
    "enforceEager not a bool": ({"engine": {"enforceEager": "yes"}}, "enforceEager must be true or false"),
    "no chunked prefill": ({"engine": {"chunkedPrefill": False}}, "maxNumBatchedTokens (512) >= spec.model.maxModelLen"),
    "bad memory": ({"resources": {"memory": "lots"}}, "spec.resources.memory: 'lots' is not a Kubernetes quantity"),
    "bad policy": ({"router": {"policy": "random"}}, "spec.router: router policy must be one of"),
    "bad model name": ({"model": {"name": "no spaces"}}, "spec.model.name"),
    "two gpus": ({"resources": {"gpus": 2}}, "gpus must be 0 or 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_raises_a_readable_spec_error(case):
    spec, fragment = BAD_SPECS[case]
    with pytest.raises(SpecError) as info:
        build_rayservice(md(spec))
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_name_that_cannot_name_a_service_is_a_spec_error():
    with pytest.raises(SpecError, match="metadata.name"):
        parse_spec(md(name="7up"))


# --- capacity ----------------------------------------------------------------------------------------


def test_capacity_of_the_default_spec_in_numbers():
    est = estimate_capacity(parse_spec(md()))
    # fp32: 134,515,008 parameters x 4 bytes; KV: 2 x 30 layers x 3 kv heads x 64 x 4 bytes per token,
    # for 2048 tokens x 16 sequences.
    assert est.weight_bytes == 134_515_008 * 4
    assert est.kv_bytes == 2 * 30 * 3 * 64 * 4 * 2048 * 16
    assert est.required_bytes == est.weight_bytes + est.kv_bytes + RUNTIME_OVERHEAD_BYTES
    assert est.available_bytes == 4 * GIB and est.fits is True
    assert est.kv_bytes == _model(build_serve_config(md()))["engine"]["kv_cache_memory_bytes"]


def test_capacity_counts_quantized_weights_and_int8_kv():
    est = estimate_capacity(parse_spec(md({"model": {"quantization": "int4"}, "engine": {"kvCacheDtype": "int8"}})))
    float_params = 49152 * 576 + 61 * 576
    assert est.weight_bytes == int((134_515_008 - float_params) * 0.625) + float_params * 4
    assert est.kv_bytes == 2 * 30 * 3 * (64 + 4) * 2048 * 16
    int8 = estimate_capacity(parse_spec(md({"model": {"quantization": "int8"}})))
    assert est.weight_bytes < int8.weight_bytes < estimate_capacity(parse_spec(md())).weight_bytes


def test_capacity_counts_a_draft_models_weights_and_kv():
    """speculative.method draft: the model's int4 copy beside it, and both models' K/V in the pool."""
    plain = estimate_capacity(parse_spec(md()))
    int4 = estimate_capacity(parse_spec(md({"model": {"quantization": "int4"}})))
    est = estimate_capacity(parse_spec(md({"engine": {"speculative": {"method": "draft"}}})))
    assert est.weight_bytes == plain.weight_bytes + int4.weight_bytes
    assert est.kv_bytes == 2 * plain.kv_bytes
    assert "weights (the model and its draft)" in est.message
    assert estimate_capacity(parse_spec(md({"engine": {"speculative": {"method": "ngram"}}}))).required_bytes == \
        plain.required_bytes  # prompt lookup needs no memory


@pytest.mark.parametrize("speculative, message", [
    ("ngram", "spec.engine.speculative must be an object, got str"),
    ({"promptLookupMin": 5},
     "spec.engine.speculative.promptLookupMax (4) must be >= spec.engine.speculative.promptLookupMin (5)"),
    ({"numSpeculativeTokens": 0}, "spec.engine.speculative.numSpeculativeTokens must be >= 1, got 0"),
    ({"method": "medusa"}, "spec.engine.speculative.method must be one of none, ngram, draft, got 'medusa'"),
])
def test_a_bad_speculative_block_is_refused_in_its_own_names(speculative, message):
    """What the schema refuses (an API server without the CRD's schema hands it over anyway), the parser
    refuses too, naming the nested field."""
    with pytest.raises(SpecError) as e:
        parse_spec(md({"engine": {"speculative": speculative}}))
    assert str(e.value) == message


def test_the_speculative_block_reaches_the_engine():
    (model,) = to_app_config(parse_spec(md({"engine": {"speculative": {
        "method": "ngram", "numSpeculativeTokens": 6, "promptLookupMax": 5}}}))).models
    assert (model.engine["speculative_method"], model.engine["num_speculative_tokens"],
            model.engine["prompt_lookup_min"], model.engine["prompt_lookup_max"]) == ("ngram", 6, 2, 5)


def test_a_replica_that_cannot_fit_says_by_how_much():
    est = estimate_capacity(parse_spec(md({"resources": {"memory": "1Gi"}})))
    assert est.fits is False
    assert est.message == ("needs 2.4 GiB (weights 0.5 GiB + KV 1.4 GiB + overhead 0.5 GiB) "
                           "but the replica has 1.0 GiB (resources.memory)")


def test_gpu_replicas_are_checked_against_gpu_memory():
    small = estimate_capacity(parse_spec(md({"resources": {"gpus": 1, "gpuMemory": "2Gi"}, "engine": {"maxNumSeqs": 64}})))
    assert small.fits is False and "(0.9 x resources.gpuMemory)" in small.message
    unknown = estimate_capacity(parse_spec(md({"resources": {"gpus": 1}})))
    assert unknown.fits is None and "gpuMemory" in unknown.message


def test_a_kv_pool_smaller_than_one_sequence_does_not_fit():
    est = estimate_capacity(parse_spec(md({"engine": {"kvCacheMemory": "32Mi"}})))
    assert est.fits is False and "fewer than maxModelLen 2048" in est.message


def test_an_unknown_model_is_unknown_not_blocked_and_hints_make_it_known():
    spec = parse_spec(md({"model": {"uri": "pvc://weights/m"}}))
    est = estimate_capacity(spec)
    assert est.fits is None and est.required_bytes is None
    assert "kv_cache_memory_bytes" not in to_app_config(spec).models[0].engine  # the engine's default then
    hinted = estimate_capacity(parse_spec(md({"model": {
        "uri": "pvc://weights/m", "parameterCount": 10**9,
        "architecture": {"numLayers": 16, "numKvHeads": 8, "headDim": 64}}})))
    assert hinted.weight_bytes == 4 * 10**9 and hinted.kv_bytes == 2 * 16 * 8 * 64 * 4 * 2048 * 16
    assert hinted.fits is False


# --- kubeinfer render ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(os.listdir(EXAMPLES)))
def test_kubeinfer_render_prints_what_the_operator_creates(name):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["render", os.path.join(EXAMPLES, name)]) == 0
    docs = list(yaml.safe_load_all(out.getvalue()))
    (body,) = load_yaml_docs(os.path.join(EXAMPLES, name))
    assert docs == render_objects([body]) == [build_rayservice(body), build_service(body)]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["render", "--mode", "serve-api", os.path.join(EXAMPLES, name)]) == 0
    assert list(yaml.safe_load_all(out.getvalue())) == [build_serve_config(body)]


def test_kubeinfer_render_of_a_bad_spec_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(md({"model": {"uri": "s3://x/y"}})))
    assert main(["render", str(path)]) == 2
    assert "unsupported scheme" in capsys.readouterr().err


# --- manifests/ ------------------------------------------------------------------------------------

MANIFESTS = os.path.join(ROOT, "manifests")


def _manifest_files() -> list[str]:
    """In the order `kubectl apply -f manifests/` applies them (file names, sorted; not recursive)."""
    return sorted(n for n in os.listdir(MANIFESTS) if n.endswith(".yaml"))


@pytest.mark.parametrize("name", _manifest_files())
def test_manifest_is_valid_kubernetes(name):
    docs = load_yaml_docs(os.path.join(MANIFESTS, name))
    assert docs and [k8s_errors(d) for d in docs] == [None] * len(docs)


def test_kubectl_apply_of_the_folder_creates_what_it_needs_before_it_is_needed():
    seen: list[tuple[str, str]] = []
    for name in _manifest_files():
        for d in load_yaml_docs(os.path.join(MANIFESTS, name)):
            namespace = d["metadata"].get("namespace")
            if namespace is not None:
                assert ("Namespace", namespace) in seen, f"{name}: {d['kind']} before its namespace"
            if d["kind"] == "Deployment":
                account = d["spec"]["template"]["spec"]["serviceAccountName"]
                assert ("ServiceAccount", account) in seen, f"{name}: Deployment before its ServiceAccount"
            seen.append((d["kind"], d["metadata"]["name"]))
    kinds = {k for k, _ in seen}
    assert {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Deployment"} <= kinds
    assert "ModelDeployment" not in kinds  # the examples live in a subfolder, which apply -f skips


def test_owner_reference_names_the_model_deployment_as_controller():
    from kubeinfer.operator.render import owner_reference
    assert owner_reference(md()) == {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment", "name": "demo",
                                     "uid": "u-1", "controller": True, "blockOwnerDeletion": True}


def test_serve_api_applications_of_same_named_deployments_do_not_collide():
    a, b = md(), md()
    a["metadata"]["namespace"], b["metadata"]["namespace"] = "team-a", "team-b"
    apps = [build_serve_config(x)["applications"][0] for x in (a, b)]
    assert apps[0]["name"] != apps[1]["name"]
    assert apps[0]["route_prefix"] != apps[1]["route_prefix"]
    assert apps[0]["route_prefix"] == f"/team-a/{a['metadata']['name']}"
    # KubeRay mode: the cluster is the deployment's own, so its application sits at "/".
    assert build_kuberay_serve_config(a)["applications"][0]["route_prefix"] == "/"
