"""What real OpenAI clients send (issue 16 items 1, 2 and 4): ``n`` (parallel sampling, HTTP and
gRPC), ``echo`` with prompt logprobs and the scoring-only shape lm-eval sends, and ``tools`` /
``tool_choice``. A real loopback uvicorn server (and gRPC server) over the router and an in-process
engine, driven by the official ``openai`` client where it can say it."""

from __future__ import annotations

import concurrent.futures
import json
import shutil

import grpc
import jsonschema
import openai
import pytest
import torch
import urllib.request

from kubeinfer.client import Client
from kubeinfer.proto import inference_pb2 as pb
from kubeinfer.router.tool_calls import ToolCallStream, parse_tool_calls
from kubeinfer.local.router import build_local_router
from kubeinfer.router.openai_schema import ChatCompletionRequest
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from tests.test_grpc_server import Server
from tests.test_http_api import MODEL, HTTPServer, StepGate, post, wait_for

PROMPT = "The quick brown fox"
# Longer than two KV blocks (16 tokens each), so the choices of one request share full blocks.
LONG_PROMPT = "Kubernetes schedules pods onto nodes; Ray Serve runs replicas. " * 2
SAMPLED = {"temperature": 1.0, "max_tokens": 12}
IGNORE_EOS = {"ignore_eos": True}
# A Hermes-style template, as SmolLM2's and Qwen2's: tools in the system turn, calls as <tool_call> blocks.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|assistant|>{% for c in m.tool_calls %}"
    "<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>"
    "{% endfor %}\n{% else %}<|{{ m.role }}|>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["c", "f"]}}, "required": ["city", "days", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TOOLS_TEMPLATE}))
    return str(path)


def spec(model_dir: str) -> ModelSpec:
    # Room for the tools' JSON, which the tiny tokenizer spends about a token a character on.
    return ModelSpec(name=MODEL, uri=model_dir, max_model_len=1024, engine={"num_kv_blocks": 160}, num_replicas=1)


def start(model_dir: str, settings: RouterSettings | None = None) -> HTTPServer:
    return HTTPServer(build_local_router(AppConfig(models=[spec(model_dir)], router=settings or RouterSettings())))


@pytest.fixture(scope="module")
def server(model_dir):
    s = start(model_dir)
    yield s
    s.close()


def tokenizer(server):
    return server.router.models[MODEL].tokenizer


def free_blocks(server) -> int:
    return server.engine().kv.pool.num_free


def idle(server) -> bool:
    return not server.engine().has_unfinished_requests()


# ---- n: parallel sampling ------------------------------------------------------------------------


def test_n_seeded_choices_are_distinct_reproducible_and_share_the_prompt(server):
    engine = server.engine()
    free, hits = free_blocks(server), engine.kv.prefix_cache_hits
    runs = [server.client.completions.create(model=MODEL, prompt=LONG_PROMPT, n=4, seed=11, **SAMPLED,
                                             extra_body=IGNORE_EOS) for _ in range(2)]
    out = runs[0]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.text for c in out.choices]
    assert len(set(texts)) == 4, texts
    assert texts == [c.text for c in runs[1].choices]  # seeded: reproducible
    # choice i is the request seeded 11 + i
    single = server.client.completions.create(model=MODEL, prompt=LONG_PROMPT, seed=13, **SAMPLED,
                                              extra_body=IGNORE_EOS)
    assert single.choices[0].text == texts[2]
    num_prompt = len(tokenizer(server).encode(LONG_PROMPT))
    assert out.usage.prompt_tokens == num_prompt  # counted once
    assert out.usage.completion_tokens == 4 * SAMPLED["max_tokens"]
    assert out.usage.total_tokens == num_prompt + 4 * SAMPLED["max_tokens"]
    # The three later choices of the first request found the first one's full prompt blocks cached.
    full = num_prompt - 1 - (num_prompt - 1) % 16
    assert full >= 32 and engine.kv.prefix_cache_hits - hits >= 3 * full
    wait_for(lambda: idle(server) and free_blocks(server) == free, "the KV blocks to return")


def test_n_streams_interleave_chunks_tagged_by_index(server):
    # Choices 1 and 2 start once choice 0's first token is out (its prompt is then in the prefix cache),
    # so with 12 tokens a fast engine could finish choice 0 before they stream: 96 tokens leave them
    # dozens of steps to join, whatever the machine's speed.
    sampled = {**SAMPLED, "max_tokens": 96}
    stream = server.client.completions.create(model=MODEL, prompt=PROMPT, n=3, seed=5, stream=True,
                                              stream_options={"include_usage": True}, **sampled, extra_body=IGNORE_EOS)
    chunks = list(stream)
    *parts, last = chunks
    texts, finishes = {}, {}
    for c in parts:
        assert len(c.choices) == 1 and c.usage is None
        choice = c.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            assert choice.index not in finishes  # one finish chunk per choice
            finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length", 2: "length"}
    whole = server.client.completions.create(model=MODEL, prompt=PROMPT, n=3, seed=5, **sampled, extra_body=IGNORE_EOS)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    indices = [c.choices[0].index for c in parts]
    assert indices.index(1) < max(i for i, x in enumerate(indices) if x == 0)  # interleaved, not one after another
    assert last.choices == [] and last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == 3 * sampled["max_tokens"]


def test_chat_n3_with_the_openai_client(server):
    out = server.client.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=1, **SAMPLED,
                                                extra_body=IGNORE_EOS)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and isinstance(c.message.content, str) for c in out.choices)
    assert len({c.message.content for c in out.choices}) == 3
    assert out.usage.completion_tokens == 3 * SAMPLED["max_tokens"]
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=1, stream=True,
                                                        **SAMPLED, extra_body=IGNORE_EOS))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert [streamed[i] for i in range(3)] == [c.message.content for c in out.choices]


def test_unseeded_choices_differ(server):
    out = server.client.completions.create(model=MODEL, prompt=PROMPT, n=4, **SAMPLED, extra_body=IGNORE_EOS)
    assert len({c.text for c in out.choices}) == 4


@pytest.mark.parametrize("n, words", [(17, "max_n"), (0, "at least 1"), (-1, "at least 1")])
def test_n_out_of_bounds_is_400(server, n, words):
    status, _, body = post(f"{server.url}/v1/completions",
                           json.dumps({"model": MODEL, "prompt": PROMPT, "n": n}).encode())
    assert status == 400 and words in body["error"]["message"], body


def test_n_beyond_what_the_router_can_hold_is_400_not_a_hang(model_dir):
    s = start(model_dir, RouterSettings(max_in_flight=2, max_queued=1, max_n=8))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            s.client.completions.create(model=MODEL, prompt=PROMPT, n=4, max_tokens=2)
        assert "at most 3" in e.value.body["message"]
        assert len(s.client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=2).choices) == 3
    finally:
        s.close()


def test_n_is_admitted_all_or_none(model_dir, monkeypatch):
    """With one request running and room for two more in the queue, n=3 gets 429 and holds nothing."""
    s = start(model_dir, RouterSettings(max_in_flight=1, max_queued=2))
    gate = StepGate(s.engine(), monkeypatch)
    try:
        gate.opened.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(s.client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=2)
            wait_for(lambda: s.router.admission.in_flight == 1, "the first request to be admitted")
            with pytest.raises(openai.RateLimitError):
                s.client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=2)
            assert (s.router.admission.in_flight, s.router.admission.queued) == (1, 0)
            gate.opened.set()
            assert held.result(timeout=60).choices[0].finish_reason == "length"
        assert len(s.client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=2).choices) == 3
        assert (s.router.admission.in_flight, s.router.admission.queued) == (0, 0)
    finally:
        gate.opened.set()
        s.close()


def test_a_client_leaving_aborts_every_choice(server):
    free = free_blocks(server)
    body = {"model": MODEL, "prompt": PROMPT, "n": 3, "stream": True, "max_tokens": 200, **IGNORE_EOS}
    request = urllib.request.Request(f"{server.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        seen = set()
        for line in r:
            if line.startswith(b"data: {"):
                seen.add(json.loads(line[6:])["choices"][0]["index"])
            if len(seen) == 3:
                break
        assert server.engine().has_unfinished_requests()
    wait_for(lambda: idle(server) and free_blocks(server) == free, "every choice to be aborted")


def test_grpc_n_and_the_python_client(server, model_dir):
    g = Server(build_local_router(AppConfig(models=[spec(model_dir)], router=RouterSettings(max_n=4))))
    try:
        request = dict(prompt=PROMPT, n=3, sampling=pb.SamplingParams(max_tokens=8, temperature=1.0, seed=21,
                                                                      ignore_eos=True))

        async def run(stub, _):
            whole = await stub.Generate(pb.GenerateRequest(**request))
            streamed = [m async for m in stub.GenerateStream(pb.GenerateRequest(**request))]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Generate(pb.GenerateRequest(prompt=PROMPT, n=5))
            return whole, streamed, e.value
        whole, streamed, err = g.call(run)
        assert [c.index for c in whole.choices] == [0, 1, 2] and whole.text == whole.choices[0].text
        assert len({c.text for c in whole.choices}) == 3
        assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens == len(tokenizer(server).encode(PROMPT))
        for i in range(3):
            mine = [m for m in streamed if m.index == i]
            assert "".join(m.text for m in mine) == whole.choices[i].text
            assert [bool(m.finish_reason) for m in mine][-1] and sum(bool(m.finish_reason) for m in mine) == 1
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_n" in err.details()
        with Client(f"127.0.0.1:{g.port}") as client:
            out = client.generate(PROMPT, n=3, max_tokens=8, temperature=1.0, seed=21, ignore_eos=True)
            assert [c.text for c in out.choices] == [c.text for c in whole.choices]
            deltas = list(client.stream(PROMPT, n=2, max_tokens=4, seed=21, ignore_eos=True))
            assert sorted({d.index for d in deltas}) == [0, 1]
    finally:
        g.close()


# ---- echo and prompt logprobs ----------------------------------------------------------------------


def test_echo_returns_the_prompt_before_the_completion(server):
    plain = server.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0.0, max_tokens=6,
                                             extra_body=IGNORE_EOS)
    echoed = server.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0.0, max_tokens=6, echo=True,
                                              extra_body=IGNORE_EOS)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0.0, max_tokens=6,
                                                   echo=True, stream=True, extra_body=IGNORE_EOS))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain.choices[0].text
    ids = tokenizer(server).encode(PROMPT)
    by_ids = server.client.completions.create(model=MODEL, prompt=ids, temperature=0.0, max_tokens=6, echo=True,
                                              extra_body=IGNORE_EOS)
    assert by_ids.choices[0].text == tokenizer(server).decode(ids) + plain.choices[0].text


def test_echo_with_max_tokens_0_scores_only(server):
    out = server.client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0)
    assert out.choices[0].text == PROMPT and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(tokenizer(server).encode(PROMPT))
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert "max_tokens" in e.value.body["message"]


def reference_prompt_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, and the full distributions, by transformers."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_logprobs_cover_the_prompt_then_the_completion(server, model_dir):
    ids = tokenizer(server).encode(PROMPT)
    out = server.client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=4,
                                           temperature=0.0, extra_body=IGNORE_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == len(PROMPT)
    ref = reference_prompt_logprobs(model_dir, ids)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-3)


def test_echo_logprobs_with_n_choices_streaming_and_not(server):
    """Only the first choice's job scores the prompt; every choice's logprobs start with it."""
    ids = tokenizer(server).encode(PROMPT)
    kwargs = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=3, n=2, seed=4, extra_body=IGNORE_EOS)
    out = server.client.completions.create(**kwargs)
    prompt_parts = [c.logprobs.token_logprobs[:len(ids)] for c in out.choices]
    assert prompt_parts[0] == prompt_parts[1] and prompt_parts[0][0] is None and None not in prompt_parts[0][1:]
    assert all(len(c.logprobs.tokens) == len(ids) + 3 and c.text.startswith(PROMPT) for c in out.choices)
    chunks = list(server.client.completions.create(**kwargs, stream=True))
    for i, choice in enumerate(out.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].text.startswith(PROMPT) and mine[0].logprobs.token_logprobs[:len(ids)] == prompt_parts[0]
        assert "".join(c.text for c in mine) == choice.text
        streamed = [x for c in mine for x in c.logprobs.token_logprobs]
        assert streamed[:len(ids)] == prompt_parts[0]  # the batch differs: completion logprobs to float noise
        assert streamed[len(ids):] == pytest.approx(choice.logprobs.token_logprobs[len(ids):], abs=1e-4)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_lm_eval_request_shape(server, model_dir, max_tokens):
    """lm-eval's loglikelihood request: token ids, echo, logprobs 1, and max_tokens 0 (the issue's
    shape) or 1 (what lm-eval 0.4's local-completions sends, dropping the last entry itself)."""
    ids = tokenizer(server).encode(PROMPT)
    status, _, body = post(f"{server.url}/v1/completions", json.dumps(
        {"model": MODEL, "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0,
         "seed": 1234}).encode())
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == max_tokens
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
    ref = reference_prompt_logprobs(model_dir, ids)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-3)
    # lm-eval's parse_logprobs: the continuation is the prompt's last 2 tokens here (ctxlen = len - 2)
    ctxlen, end = len(ids) - 2, len(ids)
    scored = lp["token_logprobs"][ctxlen:end]
    assert sum(scored) == pytest.approx(sum(expected[-2:]), abs=1e-3)
    greedy = [tok == max(top.values()) for tok, top in zip(scored, lp["top_logprobs"][ctxlen:end])]
    assert greedy == [ids[i] == int(ref[i - 1].argmax()) for i in range(ctxlen, end)]


def test_vllm_prompt_logprobs_extra(server):
    ids = tokenizer(server).encode(PROMPT)
    status, _, body = post(f"{server.url}/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT, "prompt_logprobs": 2, "max_tokens": 2}).encode())
    assert status == 200, body
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert all({"logprob", "rank", "decoded_token"} <= set(v) for v in entry.values())


# ---- tools ---------------------------------------------------------------------------------------------


def test_tool_call_parser_on_template_formatted_replies():
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "days": 2}}\n'
             '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>')
    content, calls = parse_tool_calls(reply)
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "paris", "days": 2}
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')  # unclosed at the end
    assert content is None and calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("step", [1, 2, 3, 5, 64])
def test_tool_call_stream_deltas(step):
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "n": [1, {"x": 2}]}}\n'
             '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>')
    parser, deltas = ToolCallStream(), []
    for i in range(0, len(reply), step):
        deltas += parser.feed(reply[i:i + step])
    deltas += parser.finish()
    assert "".join(d.get("content", "") for d in deltas) == "Let me check.\n"
    calls: dict[int, dict] = {}
    for d in deltas:
        assert set(d) in ({"content"}, {"tool_calls"})
        for frag in d.get("tool_calls", []):
            if "id" in frag:  # the first fragment of a call: index, id, type, name
                assert frag["index"] not in calls and frag["type"] == "function"
                calls[frag["index"]] = {"name": frag["function"]["name"], "arguments": frag["function"]["arguments"]}
            else:
                calls[frag["index"]]["arguments"] += frag["function"]["arguments"]
    assert all(c["arguments"] == c["arguments"].strip() for c in calls.values())  # the JSON alone
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("get_weather", {"city": "paris", "n": [1, {"x": 2}]}), ("get_time", {"zone": "utc"})]
    assert parser.calls == 2


def test_stream_holds_back_only_what_may_start_a_tag():
    parser = ToolCallStream()
    assert parser.feed("a <tool") == [{"content": "a "}]
    assert parser.feed("_c") == []
    assert parser.feed("x < y") == [{"content": "<tool_cx < y"}]
    assert parser.feed(" <") == [{"content": " "}]
    assert parser.finish() == [{"content": "<"}] and parser.calls == 0


def check_calls(message, schemas=SCHEMAS) -> list[str]:
    assert message.content is None and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [c.function.name for c in message.tool_calls]


def test_tool_choice_required_gives_valid_calls_with_the_openai_client(server):
    for seed in range(6):
        out = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                    seed=seed, temperature=1.0, max_tokens=200,
                                                    parallel_tool_calls=False)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(check_calls(choice.message)) == 1
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                        seed=5, temperature=1.0, max_tokens=200, stream=True))
    frags = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    streamed = [(f.function.name, json.loads(f.function.arguments)) for f in frags]
    assert len(frags) >= 1 and all(f.id.startswith("call_") for f in frags)
    for name, arguments in streamed:
        jsonschema.validate(arguments, SCHEMAS[name])
    whole = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  seed=5, temperature=1.0, max_tokens=200)
    assert streamed == [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_named_function_streaming_and_not(server):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        out = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                                    seed=seed, temperature=1.0, max_tokens=200)
        assert check_calls(out.choices[0].message) == ["get_weather"]
        assert out.choices[0].finish_reason == "tool_calls"
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                                        seed=seed, temperature=1.0, max_tokens=200, stream=True))
    frags = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert frags[0].id.startswith("call_") and frags[0].function.name == "get_weather"
    assert all(f.index == 0 and f.id is None for f in frags[1:])
    arguments = "".join(f.function.arguments or "" for f in frags)
    assert json.loads(arguments) == json.loads(out.choices[0].message.tool_calls[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_forced_call_cut_short_is_content_with_finish_reason_length(server):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                    seed=0, max_tokens=3)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "length" and not message.tool_calls
        assert message.content and message.content[0] in "[{"  # the start of the constrained JSON


def test_tool_choice_auto_reads_a_template_formatted_reply(server):
    """The random model's reply is forced (a regex) into the template's tool-call syntax; auto parses it."""
    regex = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, seed=3, temperature=1.0, max_tokens=100,
                  extra_body={"guided_regex": regex})
    out = server.client.chat.completions.create(**kwargs)
    assert check_calls(out.choices[0].message) == ["get_time"] and out.choices[0].finish_reason == "tool_calls"
    chunks = list(server.client.chat.completions.create(**kwargs, stream=True))
    frags = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert frags[0].function.name == "get_time" and frags[0].id.startswith("call_")
    assert json.loads("".join(f.function.arguments or "" for f in frags)) == \
        json.loads(out.choices[0].message.tool_calls[0].function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_auto_on_free_output_is_well_formed(server):
    for stream in (False, True):
        out = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto",
                                                    seed=2, max_tokens=16, stream=stream)
        if stream:
            chunks = list(out)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")
        else:
            message = out.choices[0].message
            assert message.content is None or isinstance(message.content, str)
            assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_are_rendered_and_tool_history_is_accepted(server):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"paris\", \"days\": 1, \"unit\": \"c\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    out = server.client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=4)
    kwargs = ChatCompletionRequest(messages=history, tools=TOOLS).prepare_kwargs()
    rendered = tokenizer(server).decode(server.router.prepare(messages=kwargs["messages"],
                                                              chat_template=kwargs["chat_template"]).prompt_token_ids)
    assert '"name": "get_weather"' in rendered and "<|tool|>sunny, 21 C" in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "paris", "days": 1, "unit": "c"}}' in rendered
    assert out.usage.prompt_tokens == len(tokenizer(server).encode(rendered))
    none = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                                 max_tokens=2)
    assert none.usage.prompt_tokens < out.usage.prompt_tokens  # no tools rendered


@pytest.mark.parametrize("extra, words", [
    ({"tools": {"a": 1}}, "non-empty list"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "name"),
    ({"tools": TOOLS + TOOLS[:1]}, "two tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "structured output"),
])
def test_bad_tools_are_400(server, extra, words):
    status, _, body = post(f"{server.url}/v1/chat/completions",
                           json.dumps({"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}).encode())
    assert status == 400 and words in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"
