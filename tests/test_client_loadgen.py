"""kubeinfer.client, `kubeinfer generate --server`, the load generator and `kubeinfer bench`, against a
real loopback gRPC server over the router and in-process engines (no Ray); the report's arithmetic on
synthetic records."""

from __future__ import annotations

import asyncio
import json
import math
import shutil

import grpc
import pytest

from kubeinfer.bench.loadgen import LoadSpec, arrival_times, run_load_at
from kubeinfer.bench.report import RequestRecord, format_report, summarize
from kubeinfer.bench.workloads import SharedPrefixWorkload, SimpleWorkload, make_workload
from kubeinfer.cli import main
from kubeinfer.client import AsyncClient, Client, ServerError, build_request
from kubeinfer.local.router import build_local_router
from kubeinfer.serve.config import AppConfig, ModelSpec
from kubeinfer.worker.tokenizer import Tokenizer
from tests.test_grpc_server import Server

PROMPT = "The quick brown fox"
GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny model plus a chat template, so chat requests render."""
    path = str(tmp_path_factory.mktemp("tiny-chat") / "model")
    shutil.copytree(tiny_llama_dir, path)
    with open(f"{path}/chat_template.jinja", "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def address(model_dir):
    spec = ModelSpec(name="tiny", uri=model_dir, max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=2)
    server = Server(build_local_router(AppConfig(models=[spec])))
    yield f"127.0.0.1:{server.port}"
    server.close()


# ---- the client ------------------------------------------------------------------------------------


def test_stream_gives_the_unary_generates_greedy_text(address):
    with Client(address) as client:
        whole = client.generate(PROMPT, **GREEDY)
        deltas = list(client.stream(PROMPT, **GREEDY))
    assert whole.finish_reason == "length" and len(whole.token_ids) == 10 and whole.model == "tiny"
    assert whole.usage.completion_tokens == 10 and whole.usage.prompt_tokens > 0
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage == whole.usage


def test_async_client_matches_the_sync_one(address):
    with Client(address) as client:
        expected = client.generate(PROMPT, **GREEDY)

    async def run():
        async with AsyncClient(address) as client:
            whole = await client.generate(PROMPT, **GREEDY)
            deltas = [d async for d in client.stream(PROMPT, **GREEDY)]
            return whole, deltas, await client.list_models(), await client.health()

    whole, deltas, models, health = asyncio.run(run())
    assert whole.text == expected.text and whole.token_ids == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert [m.id for m in models] == ["tiny"] and health == "SERVING"


def test_messages_and_token_ids_are_sent_as_such(address, model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    tokenizer = Tokenizer.from_hf_dir(model_dir)
    with Client(address) as client:
        chat = client.generate(messages=messages, **GREEDY)
        rendered = client.generate(tokenizer.apply_chat_template(messages), **GREEDY)
        by_ids = client.generate(prompt_token_ids=tokenizer.encode(PROMPT), **GREEDY)
        by_text = client.generate(PROMPT, **GREEDY)
    assert chat.token_ids == rendered.token_ids
    assert by_ids.token_ids == by_text.token_ids


def test_list_models_and_health(address):
    with Client(address) as client:
        (model,) = client.list_models()
        assert (model.id, model.max_model_len, model.quantization) == ("tiny", 256, "")
        assert client.health() == "SERVING"
        assert client.health("kubeinfer.v1.Inference") == "SERVING"
        with pytest.raises(ServerError) as e:
            client.health("no.such.Service")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_errors_are_server_errors_with_the_status_code(address):
    with Client(address) as client:
        with pytest.raises(ServerError) as e:
            client.generate(PROMPT, model="nope")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.message
        assert e.value.retry_after_s is None
        with pytest.raises(ServerError) as e:
            list(client.stream(PROMPT, model="nope"))
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ServerError) as e:
            client.generate(PROMPT, temperature=-1.0)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.message
        assert client.generate(PROMPT, **GREEDY).finish_reason == "length"  # still serving

    async def run():
        async with AsyncClient(address) as client:
            with pytest.raises(ServerError) as e:
                [d async for d in client.stream(PROMPT, model="nope")]
            return e.value.code

    assert asyncio.run(run()) == grpc.StatusCode.NOT_FOUND


def test_no_server_is_unavailable():
    with Client("127.0.0.1:1") as client:
        with pytest.raises(ServerError) as e:
            client.generate(PROMPT, timeout=5)
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class FakeRpcError(grpc.RpcError):
    def __init__(self, trailers):
        self._trailers = trailers

    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return "the queue is full"

    def trailing_metadata(self):
        return self._trailers


def test_server_error_reads_the_retry_hint():
    e = ServerError.from_rpc_error(FakeRpcError((("retry-after-s", "0.250"),)))
    assert (e.code, e.message, e.retry_after_s) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full", 0.25)
    assert ServerError.from_rpc_error(FakeRpcError((("retry-after-s", "soon"),))).retry_after_s is None
    assert ServerError.from_rpc_error(FakeRpcError(None)).retry_after_s is None


def test_exactly_one_input_is_required(address):
    with Client(address) as client:
        with pytest.raises(ValueError):
            client.generate()
        with pytest.raises(ValueError):
            client.generate(PROMPT, prompt_token_ids=[1, 2])


def test_structured_output_arguments_constrain_the_output(address):
    """vLLM's guided_* names reach the server's grammar engine: even a random-weight model's sampled
    output is exactly what the constraint allows."""
    with Client(address) as client:
        choice = client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=3, guided_choice=["yes", "no"])
        assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
        digits = client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=4, guided_regex=r"[0-9]{3}")
        assert len(digits.text) == 3 and digits.text.isdigit()
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        obj = client.generate(PROMPT, max_tokens=32, temperature=1.0, seed=5, guided_json=schema)
        assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text)["ok"], bool)
        with pytest.raises(ServerError) as info:
            client.generate(PROMPT, max_tokens=4, guided_regex="(unclosed")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="at most one"):
        build_request(PROMPT, guided_regex="a", json_object=True)


# ---- the command line -----------------------------------------------------------------------------


def test_generate_with_server_streams_the_servers_text(address, capsys):
    with Client(address) as client:
        expected = client.generate(PROMPT, **GREEDY).text
        chat = client.generate(messages=[{"role": "user", "content": PROMPT}], **GREEDY).text
    flags = ["--temperature", "0", "--max-tokens", "10", "--ignore-eos"]
    assert main(["generate", "--server", address, PROMPT, *flags]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--server", address, "--chat", PROMPT, *flags]) == 0
    assert capsys.readouterr().out == chat + "\n"
    assert main(["generate", "--server", address, "--model", "nope", PROMPT]) == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "nope" in err and "Traceback" not in err


def test_bench_command_prints_the_report(address, capsys):
    args = ["bench", "--server", address, "--rate", "200", "--num-requests", "4", "--max-tokens", "3",
            "--ignore-eos"]
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 4 and summary["output_tokens"] == 12
    assert main([*args, "--workload", "shared-prefix", "--num-prefixes", "2", "--prefix-words", "12"]) == 0
    out = capsys.readouterr().out
    assert "completed: 4" in out and "TTFT" in out and "p99" in out


def test_bench_without_a_server_loads_an_in_process_stack_built_from_the_engine_flags(model_dir, capsys):
    from kubeinfer.bench.command import in_process_app
    from kubeinfer.cli import build_parser
    flags = ["--model", model_dir, "--device", "cpu", "--kernel-backend", "torch", "--max-model-len", "256",
             "--kv-cache-memory-gb", "0.01", "--max-num-seqs", "4"]
    (model,) = in_process_app(build_parser().parse_args(["bench", *flags])).models
    assert (model.uri, model.max_model_len) == (model_dir, 256)
    assert {k: model.engine[k] for k in ("device", "kernel_backend", "max_num_seqs", "kv_cache_memory_bytes")} == \
        {"device": "cpu", "kernel_backend": "torch", "max_num_seqs": 4, "kv_cache_memory_bytes": int(0.01 * (1 << 30))}
    load = ["--rate", "200", "--num-requests", "3", "--max-tokens", "4", "--ignore-eos"]
    assert main(["bench", *flags, *load, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["completed"] == 3 and summary["output_tokens"] == 12
    assert main(["bench", *flags, *load]) == 0
    assert f"against an in-process engine ({model_dir}, device cpu, float32)" in capsys.readouterr().out
    (model,) = in_process_app(build_parser().parse_args(["bench", "--device", "auto"])).models
    assert model.engine["device"] in ("cpu", "cuda:0")  # what auto resolved to, as the report says


# ---- the load generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("workload", [SimpleWorkload(), SharedPrefixWorkload(num_prefixes=2, prefix_words=12)],
                         ids=["simple", "shared-prefix"])
def test_load_generator_completes_every_request(address, workload):
    spec = LoadSpec(rate=500.0, num_requests=8, max_tokens=5, ignore_eos=True)
    records = asyncio.run(run_load_at(address, workload, spec))
    assert len(records) == 8 and all(r.ok for r in records), [r.error for r in records]
    assert all(r.output_tokens == 5 and r.ttft_s is not None and len(r.itl_s) <= 4 for r in records)
    s = summarize(records)
    assert (s["requests"], s["completed"], s["failed"], s["failed_by_code"]) == (8, 8, 0, {})
    assert s["output_tokens"] == 40 and s["prompt_tokens"] > 0
    assert s["request_throughput"] > 0 and s["output_throughput"] > 0
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert 0 <= s[key]["p50"] <= s[key]["p99"]
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]


def test_load_generator_counts_failures_by_code(address):
    spec = LoadSpec(rate=math.inf, num_requests=3, max_tokens=2, model="nope")
    s = summarize(asyncio.run(run_load_at(address, SimpleWorkload(), spec)))
    assert (s["completed"], s["failed"], s["failed_by_code"]) == (0, 3, {"NOT_FOUND": 3})
    assert s["ttft_ms"] == {"mean": None, "p50": None, "p99": None}
    assert "NOT_FOUND 3" in format_report(s)


def test_load_spec_validation():
    with pytest.raises(ValueError):
        LoadSpec(rate=0, num_requests=1)
    with pytest.raises(ValueError):
        LoadSpec(rate=1)
    with pytest.raises(ValueError):
        LoadSpec(rate=1, num_requests=1, max_tokens=0)


def test_arrivals_are_poisson_and_seeded():
    def take(n, rate, seed):
        it = arrival_times(rate, seed)
        return [next(it) for _ in range(n)]

    times = take(20001, 50.0, 1)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.05)
    assert take(10, 50.0, 1) == times[:10] and take(10, 50.0, 2) != times[:10]
    assert take(3, math.inf, 0) == [0.0, 0.0, 0.0]


def test_shared_prefix_workload():
    w = SharedPrefixWorkload(num_prefixes=3, prefix_words=40, seed=5)
    items = [w.next() for _ in range(60)]
    assert {i.prefix_index for i in items} == {0, 1, 2}
    assert all(i.prompt.startswith(w.prefixes[i.prefix_index]) for i in items)
    assert len({p[:20] for p in w.prefixes}) == 3  # distinct from the first words on
    again = SharedPrefixWorkload(num_prefixes=3, prefix_words=40, seed=5)
    assert [again.next() for _ in range(60)] == items
    with pytest.raises(ValueError):
        make_workload("nope")


# ---- the report -----------------------------------------------------------------------------------


def test_summarize_known_percentiles():
    # 101 completed requests with TTFT 0..100 ms and end-to-end 1000..1100 ms, plus two failures.
    records = [RequestRecord(start_s=i * 0.01, end_s=i * 0.01 + 1.0 + i / 1000, ttft_s=i / 1000,
                             itl_s=[0.002, 0.004], output_tokens=3, prompt_tokens=10, cached_prompt_tokens=4)
               for i in range(101)]
    records += [RequestRecord(start_s=0.5, end_s=0.6, code="RESOURCE_EXHAUSTED"),
                RequestRecord(start_s=0.7, end_s=0.8, code="NOT_FOUND")]
    s = summarize(records)
    assert (s["requests"], s["completed"], s["failed"]) == (103, 101, 2)
    assert s["failed_by_code"] == {"NOT_FOUND": 1, "RESOURCE_EXHAUSTED": 1}
    assert s["ttft_ms"]["p50"] == pytest.approx(50.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(99.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(50.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(1050.0)
    assert s["itl_ms"]["p50"] == pytest.approx(3.0) and s["itl_ms"]["mean"] == pytest.approx(3.0)
    assert s["duration_s"] == pytest.approx(2.1)  # first send at 0, last answer at 1.0 + 1.1
    assert s["request_throughput"] == pytest.approx(101 / 2.1)
    assert s["output_tokens"] == 303 and s["output_throughput"] == pytest.approx(303 / 2.1)
    assert (s["prompt_tokens"], s["cached_prompt_tokens"]) == (1010, 404)
    text = format_report(s)
    assert "completed: 101" in text and "RESOURCE_EXHAUSTED 1" in text


def test_summarize_interpolates_between_ranks():
    records = [RequestRecord(0.0, 1.0, ttft_s=t) for t in (0.010, 0.020, 0.030, 0.040)]
    s = summarize(records)
    assert s["ttft_ms"]["p50"] == pytest.approx(25.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(39.7)


def test_summarize_nothing():
    s = summarize([])
    assert (s["requests"], s["completed"], s["duration_s"], s["request_throughput"]) == (0, 0, 0.0, 0.0)
    assert s["e2e_ms"]["p50"] is None
    assert "completed: 0" in format_report(s)
