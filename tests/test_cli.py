"""The `kubeinfer` command, run as a user would (a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kubeinfer.worker import Engine, SamplingParams


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubeinfer.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_streams_the_engines_text(tiny_llama_dir):
    prompt = "The quick brown fox"
    expected = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=32).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].text
    run = run_cli("generate", prompt, "--model", tiny_llama_dir, "--temperature", "0", "--max-tokens", "12",
                  "--ignore-eos", "--max-model-len", "256")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"


def test_generate_seeded_sampling_is_reproducible(tiny_llama_dir):
    args = ("generate", "hello", "--model", tiny_llama_dir, "--seed", "3", "--max-tokens", "10",
            "--ignore-eos", "--max-model-len", "256", "--top-k", "20")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_bad_flags_and_paths_give_one_line_errors(tmp_path):
    run = run_cli("generate", "x", "--temperature", "-1")
    assert run.returncode == 2 and "temperature" in run.stderr and "Traceback" not in run.stderr
    run = run_cli("generate", "x", "--model", str(tmp_path / "missing"))
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr


# ---- devices and the engine flags ------------------------------------------------------------------

def _missing_cuda_device() -> str:
    """A CUDA device this machine does not have: any, without CUDA; an absurd index, with it."""
    import torch
    return "cuda:99" if torch.cuda.is_available() else "cuda"


def test_a_missing_gpu_is_one_line_of_error_before_anything_loads():
    # The model path does not exist either: had the model been loaded first, that would be the error.
    for command in (["generate", "Hi"], ["eval", "ppl"], ["bench", "--num-requests", "1"]):
        run = run_cli(*command, "--device", _missing_cuda_device(), "--model", "/nonexistent/model")
        assert run.returncode == 2, (command, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kubeinfer: error: device 'cuda"), (command, run.stderr)
        assert "does not exist" not in run.stderr and run.stdout == ""


def test_a_device_that_is_no_device_is_one_line_of_error():
    run = run_cli("generate", "Hi", "--device", "gpu")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["kubeinfer: error: device must be auto, cpu, cuda or cuda:N, got 'gpu'"]


def test_engine_flags_reach_the_engine_config():
    from kubeinfer.cli import build_parser, engine_config_from_args
    args = build_parser().parse_args(["generate", "x", "--device", "cpu", "--gpu-memory-utilization", "0.5",
                                      "--enforce-eager", "--kernel-backend", "torch", "--dtype", "bfloat16"])
    config = engine_config_from_args(args)
    assert (config.device, config.gpu_memory_utilization, config.enforce_eager, config.kernel_backend,
            config.dtype) == ("cpu", 0.5, True, "torch", "bfloat16")
    assert config.kv_cache_memory_bytes is None  # the engine's default for its device
    args = build_parser().parse_args(["eval", "ppl", "--kv-cache-memory-gb", "0.25"])
    assert engine_config_from_args(args).kv_cache_memory_bytes == 1 << 28
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        engine_config_from_args(build_parser().parse_args(["generate", "x", "--gpu-memory-utilization", "1.5"]))


# ---- kubeinfer serve's flags ------------------------------------------------------------------------

def serve_app(*flags: str):
    from kubeinfer.cli import build_parser
    from kubeinfer.serve.command import app_config_from_args
    return app_config_from_args(build_parser().parse_args(["serve", *flags]))


def test_serve_flags_reach_the_application():
    (model,) = serve_app("--device", "auto", "--gpus-per-replica", "1", "--gpu-memory-utilization", "0.8",
                         "--enforce-eager", "--kernel-backend", "triton", "--dtype", "bfloat16").models
    assert model.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert {k: model.engine[k] for k in ("device", "gpu_memory_utilization", "enforce_eager", "kernel_backend",
                                         "dtype")} == {"device": "cuda", "gpu_memory_utilization": 0.8,
                                                       "enforce_eager": True, "kernel_backend": "triton",
                                                       "dtype": "bfloat16"}
    assert "kv_cache_memory_bytes" not in model.engine  # a GPU replica sizes its pool itself
    (model,) = serve_app("--kv-cache-memory-gb", "2").models
    assert (model.engine["device"], model.engine["kv_cache_memory_bytes"]) == ("cpu", 2 << 30)
    # Every engine flag reaches the replicas, at the same defaults as generate's.
    assert {k: model.engine[k] for k in ("gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
                                         "block_size", "enable_chunked_prefill")} == \
        {"gpu_memory_utilization": 0.9, "max_num_seqs": 64, "max_num_batched_tokens": 512, "block_size": 16,
         "enable_chunked_prefill": True}
    (model,) = serve_app("--group-size", "64", "--quantization", "int4", "--max-num-batched-tokens", "256",
                         "--kv-cache-dtype", "int8", "--no-chunked-prefill", "--threads", "3").models
    assert (model.quantization, model.engine["quantization_group_size"], model.engine["max_num_batched_tokens"],
            model.engine["kv_cache_dtype"], model.engine["enable_chunked_prefill"],
            model.engine["num_threads"]) == ("int4", 64, 256, "int8", False, 3)
    assert serve_app("--quantization", "none").models[0].quantization is None
    # The router's bounds too; unset, the router sizes them from the replicas' capacity.
    router = serve_app("--max-in-flight", "512", "--max-queued", "64").router
    assert (router.max_in_flight, router.max_queued) == (512, 64)
    assert (serve_app().router.max_in_flight, serve_app().router.max_queued) == (None, None)


def test_serve_settings_are_ones_the_engine_takes():
    """What a replica hands EngineConfig (torch-free checks in the CLI must not let through what the
    engine refuses, nor refuse what it takes)."""
    from kubeinfer.worker import EngineConfig
    cases = {("--gpus-per-replica", "1", "--enforce-eager"): "cuda", ("--cpus-per-replica", "2"): "cpu",
             ("--device", "cuda:1", "--gpus-per-replica", "2"): "cuda:1"}
    for flags, device in cases.items():
        (model,) = serve_app(*flags).models
        assert EngineConfig(**model.replica_engine_kwargs()).device == device
    assert EngineConfig(**serve_app("--cpus-per-replica", "2").models[0].replica_engine_kwargs()).num_threads == 2


def test_serve_reserves_a_gpu_when_asked_for_cuda(monkeypatch):
    """``--device cuda`` alone reserves one GPU per replica; ``auto`` does on a local Ray only where
    torch sees a GPU (this machine has none; a GPU box is stood in for by torch's answer)."""
    (model,) = serve_app("--device", "cuda", "--address", "auto").models
    assert model.ray_actor_options["num_gpus"] == 1 and model.engine["device"] == "cuda"
    (model,) = serve_app().models
    assert "num_gpus" not in model.ray_actor_options and model.engine["device"] == "cpu"
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (model,) = serve_app().models
    assert model.ray_actor_options["num_gpus"] == 1 and model.engine["device"] == "cuda"
    (model,) = serve_app("--address", "auto").models  # a remote cluster: this machine's GPU says nothing
    assert "num_gpus" not in model.ray_actor_options


@pytest.mark.parametrize("flags, fragment", [
    (("--device", "cuda", "--gpus-per-replica", "0"), "device 'cuda' needs a GPU reserved per replica"),
    (("--device", "cpu", "--gpus-per-replica", "1"), "reserve a GPU the replica never uses"),
    (("--device", "cuda:1", "--gpus-per-replica", "1"), "sees only the 1 GPU(s) it reserved, numbered from 0"),
    (("--gpus-per-replica", "-1"), "--gpus-per-replica must be >= 0"),
    (("--device", "tpu"), "device must be auto, cpu, cuda or cuda:N"),
    (("--gpu-memory-utilization", "0"), "gpu_memory_utilization must be in (0, 1]"),
    (("--kv-cache-memory-gb", "0"), "--kv-cache-memory-gb must be > 0"),
])
def test_serve_refuses_a_device_its_replicas_cannot_have(flags, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        serve_app(*flags)


def test_serve_with_cuda_and_no_gpu_per_replica_is_one_line_of_error(capsys):
    from kubeinfer.cli import main
    assert main(["serve", "--device", "cuda", "--gpus-per-replica", "0"]) == 2  # refused before Ray starts
    err = capsys.readouterr().err
    assert err.startswith("kubeinfer: error: model 'smollm2-135m': device 'cuda' needs a GPU reserved per replica")
    assert len(err.splitlines()) == 1


def test_serve_on_cuda_without_a_gpu_is_one_line_of_error(capsys):
    from kubeinfer.cli import main
    assert main(["serve", "--device", "cuda"]) == 2  # this machine has no GPU: not a replica waiting for ever
    err = capsys.readouterr().err
    assert err.startswith("kubeinfer: error: device 'cuda' was asked for, but this machine has no CUDA device")
    assert len(err.splitlines()) == 1
