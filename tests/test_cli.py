"""The `kubeinfer` command, run as a user would (a subprocess)."""

from __future__ import annotations

import subprocess
import sys

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
