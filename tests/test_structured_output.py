"""Structured output (issue #16 item 3): xgrammar masks the logits of a random-weight model, whose free
output is garbage, so that every constrained completion matches its schema, regex, choice or grammar;
unconstrained requests in the same batch are untouched; bad constraints are the client's error on HTTP
and gRPC alike (real loopback servers)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import grpc
import jsonschema
import pytest
import torch
import uvicorn

from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.proto import inference_pb2_grpc as pb_grpc
from kubeinfer.router.grpc_service import prepare_kwargs, start_grpc_server
from kubeinfer.router.http_api import build_http_app
from kubeinfer.router.openai_schema import ChatCompletionRequest, CompletionRequest, UnsupportedField
from kubeinfer.serve.config import AppConfig, ModelSpec
from kubeinfer.worker import Engine, SamplingParams
from kubeinfer.worker.sampling import Sampler, SamplingBatch
from kubeinfer.worker.sampling_params import StructuredOutputParams
from kubeinfer.worker.structured_output import GrammarError, StructuredOutput, validate

# Strings are bounded by patterns rather than maxLength: xgrammar's length-bounded string rule lets raw
# control characters through (which JSON forbids), its pattern rule does not.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "vip": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,4}$"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "vip", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe so", 'with "quotes"']
PROMPT = "The quick brown fox"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> Engine:
    return Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=128)


def sampled(n: int, max_tokens: int = 160, **structured) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, structured_output=structured)
            for i in range(n)]


# ---- the engine ----------------------------------------------------------------------------------


def test_json_schema_50_sampled_completions_validate(engine):
    outs = engine.generate([PROMPT] * 50, sampled(50, json=SCHEMA))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 10  # sampled, not one forced answer


def test_regex_and_choice_constraints(engine):
    for out in engine.generate([PROMPT] * 20, sampled(20, regex=REGEX)):
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out.text
    outs = engine.generate([PROMPT] * 20, sampled(20, choice=CHOICES))
    assert all(o.finish_reason == "stop" and o.text in CHOICES for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 1


def test_json_object_and_ebnf_grammar(engine):
    # Any object: a random model may write one string until max_tokens, so only the finished ones
    # are whole, and each of those must parse.
    outs = engine.generate([PROMPT] * 16, sampled(16, max_tokens=200, json_object=True))
    finished = [o.text for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 4, [o.text for o in outs]
    assert all(isinstance(json.loads(text), dict) for text in finished), finished
    assert all(o.text.startswith("{") for o in outs)
    grammar = 'root ::= "(" item (", " item)* ")"\nitem ::= [a-c] | [0-9] [0-9]?'
    for out in engine.generate([PROMPT] * 8, sampled(8, grammar=grammar)):
        assert out.finish_reason == "stop" and re.fullmatch(r"\(([a-c]|[0-9]{1,2})(, ([a-c]|[0-9]{1,2}))*\)",
                                                            out.text), out.text


def test_mixed_batch_leaves_unconstrained_requests_unchanged(engine):
    prompts = ["The quick brown fox", "def f(x):", "Kubernetes schedules pods", "héllo wörld"]
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = engine.generate(prompts, plain)
    constrained = [SamplingParams(max_tokens=160, temperature=0.0, structured_output={"json": SCHEMA}),
                   SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured_output={"regex": REGEX})]
    mixed = engine.generate(prompts[:2] + ["Ray Serve", "naïve café"] + prompts[2:],
                            [plain, plain, *constrained, plain, plain])
    assert [o.output_token_ids for o in mixed[:2] + mixed[4:]] == [o.output_token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[2].text), SCHEMA)
    assert re.fullmatch(REGEX, mixed[3].text)
    assert engine._num_constrained == 0


def test_plain_steps_do_no_grammar_work(tiny_llama_dir, monkeypatch):
    engine = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=64)
    engine.generate([PROMPT], SamplingParams(max_tokens=4))
    assert engine._structured is None  # xgrammar's vocabulary tables are built on first use only
    engine.generate([PROMPT], sampled(1, regex=REGEX))

    def forbidden(*args):
        raise AssertionError("a step without a constrained request filled a bitmask")
    monkeypatch.setattr(engine._structured, "fill_bitmask", forbidden)
    assert engine.generate([PROMPT] * 2, SamplingParams(max_tokens=4))[0].finish_reason == "length"


def test_preemption_does_not_advance_a_matcher_twice(tiny_llama_dir, engine):
    # 16 blocks of 16 tokens cannot hold four ~100-token requests: they are preempted and recomputed,
    # and each matcher must still see every token exactly once (else the grammar would reject one).
    small = Engine(model=tiny_llama_dir, max_model_len=256, num_kv_blocks=16)
    params = [SamplingParams(max_tokens=160, temperature=0.0, structured_output={"json": SCHEMA}),
              *sampled(3, json=SCHEMA)]
    outs = small.generate([PROMPT, "def f(x):", "Ray Serve", "naïve café"], params)
    assert small.stats().num_preemptions > 0
    for out in outs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert outs[0].output_token_ids == engine.generate([PROMPT], params[:1])[0].output_token_ids


def test_bitmask_covers_a_model_vocab_padded_past_the_tokenizer(engine):
    padded = engine.model_config.vocab_size + 40
    so = StructuredOutput(engine.tokenizer, padded, max_num_seqs=2)
    mask = so.fill_bitmask([(0, so.matcher(StructuredOutputParams(regex="[a-z]+")))], 1)
    logits = torch.zeros(1, padded)
    from kubeinfer.worker.structured_output import apply_bitmask
    apply_bitmask(logits, mask, [0])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and max(allowed) < engine.model_config.vocab_size
    assert all(re.fullmatch("[a-z]+", engine.tokenizer.decode([t])) for t in allowed)


def test_sampler_masks_a_copy_and_only_constrained_rows(engine):
    so = engine._structured or StructuredOutput(engine.tokenizer, engine.model_config.vocab_size, 4)
    vocab = engine.model_config.vocab_size
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0, logprobs=2)]
    batch = SamplingBatch.build(params, [[1], [1]], [[], []], [None, None], vocab)
    batch.token_bitmask = so.fill_bitmask([(1, so.matcher(StructuredOutputParams(choice=["yes"])))], 2)
    batch.bitmask_rows = [1]
    logits = torch.randn(2, vocab)
    before = logits.clone()
    out = Sampler()(logits, batch)
    assert torch.equal(logits, before)
    assert out.token_ids[0] == before[0].argmax()
    assert engine.tokenizer.decode([int(out.token_ids[1])]) in ("yes", "y")
    assert out.logprobs[1] == pytest.approx(0.0, abs=1e-6)  # the masked distribution: one token left


# ---- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"choice": []}, "non-empty"),
    ({"grammar": " "}, "non-empty"), ({"json": 3}, "JSON schema")])
def test_structured_output_params_shape(spec, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(structured_output=spec)


@pytest.mark.parametrize("spec, message", [
    ({"json": '{"type": "foo"}'}, 'Unsupported type "foo"'), ({"json": "{not json"}, "Failed to parse JSON"),
    ({"regex": "[a-"}, "Unclosed"), ({"grammar": 'root ::= "a" |'}, "EBNF")])
def test_validate_reports_the_compiler_message(engine, spec, message):
    with pytest.raises(GrammarError, match=message) as info:
        validate(StructuredOutputParams(**spec))
    assert ".cc:" not in str(info.value)  # xgrammar's log prefix is stripped
    with pytest.raises(ValueError, match=message):  # the engine refuses it too (add_request's contract)
        engine.add_request(prompt=PROMPT, params=SamplingParams(structured_output=spec))
    assert not engine.has_unfinished_requests()


def test_openai_fields_map_to_one_constraint():
    def so(body, cls=ChatCompletionRequest):
        if cls is ChatCompletionRequest:
            kwargs = cls.model_validate({"messages": [{"role": "user", "content": "hi"}], **body}).prepare_kwargs()
        else:
            kwargs = cls.model_validate({"prompt": "x", **body}).prepare_kwargs("x")
        return kwargs["sampling"].get("structured_output")
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    assert so({"response_format": fmt}) == {"json": SCHEMA}
    assert so({"response_format": fmt}, CompletionRequest) == {"json": SCHEMA}
    assert so({"response_format": {"type": "json_object"}}) == {"json_object": True}
    assert so({"response_format": {"type": "text"}}) is None
    assert so({"guided_json": json.dumps(SCHEMA)}) == {"json": json.dumps(SCHEMA)}
    assert so({"guided_regex": REGEX}, CompletionRequest) == {"regex": REGEX}
    assert so({"guided_choice": CHOICES}) == {"choice": CHOICES}
    assert so({"guided_grammar": 'root ::= "a"', "guided_decoding_backend": "xgrammar"}) == {"grammar": 'root ::= "a"'}
    for bad in ({"response_format": fmt, "guided_regex": "a"}, {"response_format": {"type": "json_schema"}},
                {"response_format": {"type": "grammar"}}, {"guided_regex": "a", "guided_decoding_backend": "outlines"}):
        with pytest.raises(UnsupportedField):
            so(bad)


def test_grpc_request_maps_to_one_constraint():
    def so(**kind):
        req = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(**kind)))
        return prepare_kwargs(req)["sampling"]["structured_output"]
    assert so(json_schema='{"type": "object"}') == {"json": '{"type": "object"}'}
    assert so(regex=REGEX) == {"regex": REGEX}
    assert so(choice=pb.Choices(choices=CHOICES)) == {"choice": CHOICES}
    assert so(grammar='root ::= "a"') == {"grammar": 'root ::= "a"'}
    assert so(json_object=True) == {"json_object": True}
    assert "structured_output" not in prepare_kwargs(pb.GenerateRequest(prompt="x"))["sampling"]


# ---- HTTP and gRPC on loopback servers ---------------------------------------------------------------


class Servers:
    """One in-process router served over HTTP (uvicorn) and gRPC, each on a thread of its own."""

    def __init__(self, model_dir: str) -> None:
        spec = ModelSpec(name="tiny", uri=model_dir, max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=1)
        self.router = build_local_router(AppConfig(models=[spec]))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.http = uvicorn.Server(uvicorn.Config(build_http_app(self.router), log_level="warning", lifespan="off"))
        self.http_thread = threading.Thread(target=self.http.run, kwargs={"sockets": [sock]}, daemon=True)
        self.http_thread.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        self.grpc, self.grpc_port = self.loop.run_until_complete(start_grpc_server(self.router, "127.0.0.1:0"))
        self.grpc_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.grpc_thread.start()
        deadline = time.monotonic() + 30
        while not self.http.started:
            assert time.monotonic() < deadline and self.http_thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def client(self):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def generate(self, request: pb.GenerateRequest) -> pb.GenerateResponse:
        async def call():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                return await pb_grpc.InferenceStub(channel).Generate(request, timeout=60)
        return asyncio.run(call())

    def close(self) -> None:
        self.http.should_exit = True
        self.http_thread.join(30)
        asyncio.run_coroutine_threadsafe(self.grpc.stop(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.grpc_thread.join()
        shutdown_local_router(self.router)


@pytest.fixture(scope="module")
def servers(tiny_llama_dir, tmp_path_factory):
    import shutil
    path = tmp_path_factory.mktemp("tiny-chat-so")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    s = Servers(str(path))
    yield s
    s.close()


def test_http_json_schema_with_the_openai_client(servers):
    client = servers.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who?"}],
                                             response_format=fmt, max_tokens=160, temperature=1.0, seed=seed)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=1,
                                    extra_body={"guided_choice": CHOICES})
    assert out.choices[0].text in CHOICES
    chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=2,
                                       stream=True, extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, "".join(c.choices[0].text for c in chunks if c.choices))


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     'Unsupported type \\"foo\\"'),
    ({"guided_regex": "[a-"}, "Unclosed"),
    ({"guided_grammar": "root ::= "}, "EBNF"),
    ({"guided_choice": []}, "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "one structured-output constraint"),
])
def test_http_bad_constraint_is_400(servers, body, message):
    import urllib.error
    import urllib.request
    data = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}).encode()
    request = urllib.request.Request(f"{servers.url}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400
    raw = info.value.read().decode()
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert message in raw


def test_grpc_structured_output_and_invalid_argument(servers):
    sampling = pb.SamplingParams(max_tokens=160, temperature=1.0, seed=5,
                                 structured_output=pb.StructuredOutput(json_schema=json.dumps(SCHEMA)))
    out = servers.generate(pb.GenerateRequest(model="tiny", prompt=PROMPT, sampling=sampling))
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
    for bad in (pb.StructuredOutput(json_schema='{"type": "foo"}'), pb.StructuredOutput(regex="(ab"),
                pb.StructuredOutput()):
        request = pb.GenerateRequest(model="tiny", prompt=PROMPT, sampling=pb.SamplingParams(structured_output=bad))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            servers.generate(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "structured" in info.value.details()
