"""Bad input gets a clear error and the engine keeps serving everything else."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from kubeinfer.worker import Engine, EngineConfig, SamplingParams
from kubeinfer.worker.models.config import CheckpointError

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> Engine:
    return Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt_token_ids=[]), "prompt is empty"),
    (dict(prompt_token_ids=[1, 2, 10_000]), "token ids must be integers in [0, 384)"),
    (dict(prompt_token_ids=list(range(3, 131))), "context is 128 tokens"),
    (dict(prompt=None), "give a prompt string or prompt_token_ids"),
])
def test_bad_requests_are_rejected(engine, kwargs, message):
    with pytest.raises(ValueError) as err:
        engine.add_request(params=GREEDY, **kwargs)
    assert message in str(err.value)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5),
    ("min_p", 2.0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("logprobs", 100),
])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_duplicate_id_rejected_and_others_keep_running(engine):
    engine.add_request("a", prompt_token_ids=[5, 6, 7], params=GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompt_token_ids=[5, 6, 7], params=GREEDY)
    with pytest.raises(ValueError):
        engine.add_request("b", prompt_token_ids=list(range(200)), params=GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["a"].num_output_tokens == 8


def test_abort_frees_blocks_and_others_finish(engine):
    engine.add_request("keep", prompt_token_ids=list(range(3, 40)), params=GREEDY)
    engine.add_request("drop", prompt_token_ids=list(range(3, 60)),
                       params=SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.abort("drop")
    assert not engine.abort("drop")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert {o.request_id for o in outs if o.finished} == {"keep"}
    assert engine.kv.usage() == 0.0


def test_length_capped_by_context(engine):
    out = engine.generate([list(range(3, 125))], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.num_output_tokens == 128 - 122


def test_stop_token_and_stop_string(engine):
    first = engine.generate([[5, 6, 7]], GREEDY)[0]
    stop_id = first.output_token_ids[2]
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.output_token_ids == first.output_token_ids[:3]
    text = first.text.strip()
    assert len(text) >= 3, "the tiny model's 8 tokens should decode to some text"
    stop = text[1:3]
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=8, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and stop not in out.text


def test_unknown_model_path():
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine(model="/no/such/model")


def test_unsupported_architecture(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        Engine(model=str(tmp_path / "m"))


def test_corrupt_safetensors(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        Engine(model=str(tmp_path / "m"))


def test_shape_mismatch(tmp_path, tiny_llama_dir):
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        Engine(model=str(tmp_path / "m"))


def test_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="neither"):
        Engine(model=str(tmp_path / "weights.bin"))


def test_bad_engine_config():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_kv_pool_smaller_than_context(tiny_llama_dir):
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        Engine(model=tiny_llama_dir, max_model_len=512, num_kv_blocks=4)


def test_failed_step_errors_its_requests_and_engine_recovers(tiny_llama_dir):
    """Fault injection: one forward pass raises. Its requests finish with an error; later ones run."""
    engine = Engine(model=tiny_llama_dir, max_model_len=128, num_kv_blocks=32)
    execute = engine.runner.execute
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return execute(*args, **kwargs)

    engine.runner.execute = failing_once
    engine.add_request("doomed", prompt_token_ids=[5, 6, 7], params=GREEDY)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("doomed", "error")]
    assert "simulated kernel failure" in outs[0].error
    assert engine.kv.usage() == 0.0 and not engine.has_unfinished_requests()
    assert engine.generate([[5, 6, 7]], GREEDY)[0].num_output_tokens == 8
