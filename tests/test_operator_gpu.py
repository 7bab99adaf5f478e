"""The operator on GPUs: resources.gpus picks the engine's device, the GPU knobs reach the engine,
the KV pool is left to the engine's gpuMemoryUtilization rule unless set, and the capacity check
measures against the share of the GPU the engine may use. Pure functions, no cluster."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import yaml

from kubeinfer.cli import main
from kubeinfer.operator.capacity import RUNTIME_OVERHEAD_BYTES, estimate_capacity, kv_pool_bytes
from kubeinfer.operator.render import build_kuberay_serve_config, build_serve_config
from kubeinfer.operator.spec import parse_spec, to_app_config
from tests.k8s_schema import ROOT

EXAMPLES = os.path.join(ROOT, "manifests", "examples")
GIB = 1 << 30
GPU = {"gpus": 1, "gpuMemory": "24Gi"}


def md(spec: dict | None = None) -> dict:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1}, "spec": spec or {}}


def engine_of(spec: dict) -> dict:
    (model,) = build_kuberay_serve_config(md(spec))["applications"][0]["args"]["models"]
    return model["engine"]


def test_a_gpu_replica_runs_on_cuda_and_a_cpu_replica_on_the_cpu():
    gpu = engine_of({"resources": GPU})
    assert gpu["device"] == "cuda"
    assert (gpu["gpu_memory_utilization"], gpu["enforce_eager"]) == (0.9, False)
    # The engine sizes its pool from gpuMemoryUtilization; a fixed size would override that rule.
    assert "kv_cache_memory_bytes" not in gpu and "num_threads" not in gpu
    cpu = engine_of({})
    assert cpu["device"] == "cpu" and cpu["kv_cache_memory_bytes"] > 0 and cpu["num_threads"] == 1
    # Every spec.engine setting is passed through (tests/test_settings_consistency.py); the GPU-only
    # ones are the engine's to ignore on a CPU.
    assert (cpu["gpu_memory_utilization"], cpu["enforce_eager"]) == (0.9, False)


def test_gpu_knobs_and_an_explicit_pool_reach_the_engine():
    engine = engine_of({"resources": GPU, "engine": {"gpuMemoryUtilization": 0.75, "enforceEager": True,
                                                     "kvCacheMemory": "6Gi"}})
    assert (engine["gpu_memory_utilization"], engine["enforce_eager"]) == (0.75, True)
    assert engine["kv_cache_memory_bytes"] == 6 * GIB


def test_the_rendered_engine_settings_are_ones_the_serving_config_accepts():
    for spec in ({"resources": GPU, "engine": {"enforceEager": True}}, {}):
        model = to_app_config(parse_spec(md(spec)), pin_to_worker_pods=True).models[0]
        kwargs = model.replica_engine_kwargs()  # what the Worker hands EngineConfig
        assert kwargs["device"] == ("cuda" if spec else "cpu")


def test_int8_kv_cache_is_accepted_with_a_gpu():
    engine = engine_of({"resources": GPU, "engine": {"kvCacheDtype": "int8"}})
    assert (engine["device"], engine["kv_cache_dtype"]) == ("cuda", "int8")


def test_kubeinfer_render_of_the_gpu_example_shows_a_cuda_engine():
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["render", os.path.join(EXAMPLES, "gpu-int4-autoscaling.yaml")]) == 0
    rayservice = next(d for d in yaml.safe_load_all(out.getvalue()) if d["kind"] == "RayService")
    (model,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["models"]
    assert model["engine"]["device"] == "cuda" and model["ray_actor_options"]["num_gpus"] == 1
    assert "device: cuda" in out.getvalue()


# --- capacity on a GPU --------------------------------------------------------------------------


def test_the_gpu_check_counts_the_full_kv_against_the_usable_share_of_the_gpu():
    # Builtin, dtype auto (bf16 on a GPU): 0.25 GiB of weights + 2048 x 16 tokens of KV (0.70 GiB)
    # + 0.5 GiB = 1.45 GiB.
    spec = {"resources": {"gpus": 1, "gpuMemory": "3Gi"}}
    roomy = estimate_capacity(parse_spec(md(spec)))
    assert roomy.kv_bytes == 2 * 30 * 3 * 64 * 2 * 2048 * 16  # counted though the engine is not given it
    assert kv_pool_bytes(parse_spec(md(spec))) is None
    assert roomy.available_bytes == int(3 * GIB * 0.9) and roomy.fits is True
    assert roomy.required_bytes == roomy.weight_bytes + roomy.kv_bytes + RUNTIME_OVERHEAD_BYTES
    # The same GPU with 40% of it for the engine: 1.2 GiB < 1.45 GiB.
    spec["engine"] = {"gpuMemoryUtilization": 0.4}
    tight = estimate_capacity(parse_spec(md(spec)))
    assert tight.fits is False and tight.available_bytes == int(3 * GIB * 0.4)
    assert tight.message.endswith("but the replica has 1.2 GiB (0.4 x resources.gpuMemory)")
    # float32 set by hand counts 4 bytes a value: 2.41 GiB does not fit 1.5 GiB.
    spec["engine"] = {"gpuMemoryUtilization": 0.5, "dtype": "float32"}
    fp32 = estimate_capacity(parse_spec(md(spec)))
    assert fp32.kv_bytes == 2 * roomy.kv_bytes and fp32.fits is False


def test_a_whole_gpu_is_named_plainly_and_without_gpu_memory_the_check_is_skipped():
    whole = estimate_capacity(parse_spec(md({"resources": {"gpus": 1, "gpuMemory": "8Gi"},
                                             "engine": {"gpuMemoryUtilization": 1}})))
    assert whole.fits is True and whole.message.endswith("of 8.0 GiB (resources.gpuMemory)")
    unknown = estimate_capacity(parse_spec(md({"resources": {"gpus": 1}})))
    assert unknown.fits is None and "set resources.gpuMemory" in unknown.message


def test_an_explicit_gpu_pool_too_small_for_one_sequence_does_not_fit():
    est = estimate_capacity(parse_spec(md({"resources": GPU, "engine": {"kvCacheMemory": "32Mi"}})))
    assert est.fits is False and "fewer than maxModelLen 2048" in est.message


@pytest.mark.parametrize("module", ["kubeinfer.operator.capacity", "kubeinfer.operator.render",
                                    "kubeinfer.operator.handlers"])
def test_the_operator_imports_without_torch(module):
    """The operator's image has no torch: its modules (KV sizing included) must not import it."""
    code = (f"import sys, {module}; from kubeinfer.operator.spec import parse_spec; "
            "from kubeinfer.operator.capacity import estimate_capacity; "
            "estimate_capacity(parse_spec({'metadata': {'name': 'x'}, 'spec': {}})); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
