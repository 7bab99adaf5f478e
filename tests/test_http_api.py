"""The OpenAI-compatible HTTP surface on a real loopback uvicorn server over the router and an
in-process engine (no Ray), driven by the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer.router.http_api import build_http_app
from kubeinfer.local.router import build_local_router, shutdown_local_router
from kubeinfer.router.router import Router
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker import Engine, SamplingParams

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "def f(x):", "héllo wörld, naïve café"]
MAX_TOKENS = 12
GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
IGNORE_EOS = {"ignore_eos": True}  # vLLM's extra: every reply has MAX_TOKENS tokens
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny model with a chat template (a copy: the shared folder stays as other tests expect)."""
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return str(path)


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    """The engine alone: the reference every greedy reply is compared with."""
    return Engine(model=model_dir, max_model_len=256, num_kv_blocks=64)


def reference(engine: Engine, prompt: str | list[int], **sampling):
    return engine.generate([prompt], SamplingParams(**{**GREEDY, **IGNORE_EOS, **sampling}))[0]


class HTTPServer:
    """A router and a uvicorn server of its app on a free loopback port, on a thread of its own."""

    def __init__(self, router: Router) -> None:
        self.router = router
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_http_app(router), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        assert self.server.started, "uvicorn did not start"
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def engine(self):
        """The one replica's Engine."""
        return self.router.models[MODEL].pool.replicas[f"{MODEL}-0"].engine.engine

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        shutdown_local_router(self.router)


def start(model_dir: str, settings: RouterSettings | None = None) -> HTTPServer:
    spec = ModelSpec(name=MODEL, uri=model_dir, max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=1)
    return HTTPServer(build_local_router(AppConfig(models=[spec], router=settings or RouterSettings())))


@pytest.fixture(scope="module")
def server(model_dir):
    s = start(model_dir)
    yield s
    s.close()


def wait_for(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class StepGate:
    """Pauses an engine between steps: while closed, its thread blocks before the next step."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.opened.set()
        step = engine.step

        def gated_step():
            self.opened.wait()
            return step()
        monkeypatch.setattr(engine, "step", gated_step)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def scrape(server: HTTPServer) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- completions and chat: the engine's greedy text ---------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_matches_engine(server, engine, prompt):
    ref = reference(engine, prompt)
    out = server.client.completions.create(model=MODEL, prompt=prompt, **GREEDY, extra_body=IGNORE_EOS)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.num_prompt_tokens, MAX_TOKENS)
    assert out.usage.total_tokens == ref.num_prompt_tokens + MAX_TOKENS


def test_completion_stream_matches_engine(server, engine):
    ref = reference(engine, PROMPTS[0])
    chunks = list(server.client.completions.create(
        model=MODEL, prompt=PROMPTS[0], stream=True, stream_options={"include_usage": True}, **GREEDY,
        extra_body=IGNORE_EOS))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == ref.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in text_chunks)


def test_prompt_as_token_ids_and_as_list(server, engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    ref = reference(engine, ids)
    for prompt in (ids, [ids], [PROMPTS[1]]):
        out = server.client.completions.create(model=MODEL, prompt=prompt, **GREEDY, extra_body=IGNORE_EOS)
        assert out.choices[0].text == ref.text, prompt


def test_stop_string_matches_engine(server, engine):
    full = reference(engine, PROMPTS[0]).text
    stop = full.strip()[2:4]
    ref = reference(engine, PROMPTS[0], stop=[stop])
    assert len(ref.text) < len(full)  # the stop string really cuts the reply
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], stop=stop, **GREEDY,
                                           extra_body=IGNORE_EOS)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, "stop")


def test_chat_matches_engine(server, engine):
    ref = reference(engine, engine.tokenizer.apply_chat_template(MESSAGES))
    out = server.client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.0,
                                                max_completion_tokens=MAX_TOKENS, extra_body=IGNORE_EOS)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (ref.num_prompt_tokens, MAX_TOKENS)


def test_chat_stream_matches_engine(server, engine):
    ref = reference(engine, engine.tokenizer.apply_chat_template(MESSAGES))
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **GREEDY,
                                                        extra_body=IGNORE_EOS))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_chat_without_a_limit_fills_the_context(server, engine):
    out = server.client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.0,
                                                extra_body=IGNORE_EOS)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 256


def test_logprobs(server, engine):
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=2, **GREEDY,
                                           extra_body=IGNORE_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX_TOKENS
    assert "".join(lp.tokens) == out.choices[0].text
    # greedy: each chosen token is the most likely one
    assert all(abs(chosen - max(top.values())) < 1e-5 for chosen, top in zip(lp.token_logprobs, lp.top_logprobs))

    chat = server.client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3,
                                                 **GREEDY, extra_body=IGNORE_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS and all(len(t.top_logprobs) == 3 for t in content)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)


def test_logprobs_of_filtered_tokens_are_finite(server):
    """top_k=2 leaves every other token at -inf, which JSON cannot carry: vLLM's -9999 stands in."""
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], logprobs=5, max_tokens=4, top_p=1.0,
                                           temperature=1.0, seed=0, extra_body={"top_k": 2, **IGNORE_EOS})
    tops = out.choices[0].logprobs.top_logprobs
    assert len(tops) == 4 and all(-9999.0 in top.values() for top in tops)
    chat = server.client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=5,
                                                 max_tokens=4, seed=0, stream=True,
                                                 extra_body={"top_k": 2, **IGNORE_EOS})
    entries = [t for c in chat if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(entries) == 4 and all(t.top_logprobs[-1].logprob == -9999.0 for t in entries)


def test_models(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="nope", prompt="hi")
    assert "nope" in e.value.body["message"] and e.value.body["type"] == "not_found_error"


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 0.0), ("max_tokens", 0),
                                          ("top_k", -5), ("presence_penalty", 3.0), ("temperature", "hot"),
                                          ("max_tokens", 1.5), ("stop", 7)])
def test_bad_sampling_value_is_400_naming_the_field(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt="hi", extra_body={field: value})
    assert field in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, field", [({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix")])
def test_unsupported_values_are_400(server, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt="hi", extra_body=extra)
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_oversize_prompt_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt=[5] * 300)
    assert "300 tokens" in e.value.body["message"]


def test_chat_with_a_bad_role_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert "role" in e.value.body["message"]


@pytest.mark.parametrize("body, needle", [(b"{not json", "not valid JSON"), (b'{"model": "tiny"}', "prompt"),
                                          (b"[1, 2]", "body")])
def test_malformed_request_is_400_json(server, body, needle):
    status, _, answer = post(f"{server.url}/v1/completions", body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and needle in answer["error"]["message"]


def test_unknown_path_is_404_json(server):
    status, _, answer = post(f"{server.url}/v1/embeddings", b"{}")
    assert status == 404 and "message" in answer["error"]


def test_overload_is_429_with_retry_after(model_dir, engine, monkeypatch):
    s = start(model_dir, RouterSettings(max_in_flight=1, max_queued=0))
    gate = StepGate(s.engine(), monkeypatch)
    try:
        gate.opened.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(s.client.completions.create, model=MODEL, prompt=PROMPTS[0], **GREEDY,
                               extra_body=IGNORE_EOS)
            wait_for(lambda: s.router.admission.in_flight == 1, "the first request to be admitted")
            with pytest.raises(openai.RateLimitError) as e:
                s.client.completions.create(model=MODEL, prompt=PROMPTS[1], **GREEDY)
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["type"] == "rate_limit_error"
            gate.opened.set()
            assert held.result(timeout=60).choices[0].text == reference(engine, PROMPTS[0]).text
        out = s.client.completions.create(model=MODEL, prompt=PROMPTS[1], **GREEDY, extra_body=IGNORE_EOS)
        assert out.choices[0].text == reference(engine, PROMPTS[1]).text
    finally:
        gate.opened.set()
        s.close()


def test_client_disconnect_mid_stream_aborts(server, engine, monkeypatch):
    gate = StepGate(server.engine(), monkeypatch)
    key = ("kubeinfer:router_requests_total", (("model_name", MODEL), ("outcome", "cancelled")))
    cancelled_before = scrape(server).get(key, 0.0)
    try:
        stream = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True, temperature=0.0,
                                                  max_tokens=200, extra_body=IGNORE_EOS)
        next(iter(stream))
        gate.opened.clear()  # at most one more step: the request cannot finish on its own
        assert server.engine().stats().num_requests_running == 1
        stream.close()
        wait_for(lambda: server.router.admission.in_flight == 0, "the router to drop the request")
        assert scrape(server).get(key, 0.0) == cancelled_before + 1
        gate.opened.set()
        wait_for(lambda: server.engine().stats().num_requests_running == 0, "the engine to abort the request")
        assert server.engine().stats().num_requests_waiting == 0
    finally:
        gate.opened.set()
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[2], **GREEDY, extra_body=IGNORE_EOS)
    assert out.choices[0].text == reference(engine, PROMPTS[2]).text


def fail_after_two_steps(server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one replica's model runner raises "injected failure" from its third step on."""
    runner = server.engine().runner
    execute, calls = runner.execute, []

    def fails_after_two_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("injected failure")
        return execute(*args, **kwargs)
    monkeypatch.setattr(runner, "execute", fails_after_two_steps)


def test_engine_failure_mid_stream_is_an_error_event(server, engine, monkeypatch):
    fail_after_two_steps(server, monkeypatch)
    stream = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True, temperature=0.0,
                                              max_tokens=50, extra_body=IGNORE_EOS)
    with pytest.raises(openai.APIError, match="injected failure") as e:
        list(stream)
    assert not isinstance(e.value, openai.APIStatusError)  # in the stream, after a 200 status line
    assert e.value.body["type"] == "server_error"
    monkeypatch.undo()
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY, extra_body=IGNORE_EOS)
    assert out.choices[0].text == reference(engine, PROMPTS[0]).text


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_before_the_first_token_aborts(server, monkeypatch, stream):
    gate = StepGate(server.engine(), monkeypatch)
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "stream": stream}).encode()
    try:
        gate.opened.clear()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: server.router.admission.in_flight == 1, "the request to be admitted")
        wait_for(lambda: server.router.admission.in_flight == 0, "the router to drop the request")
        gate.opened.set()
        wait_for(lambda: server.engine().stats().num_requests_running == 0, "the engine to abort the request")
    finally:
        gate.opened.set()


def test_stream_wire_format(server):
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "stream": True}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


# ---- health and metrics -------------------------------------------------------------------------


def test_metrics(server):
    server.client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
    samples = scrape(server)
    assert samples[("vllm:time_to_first_token_seconds_count", (("model_name", MODEL),))] >= 1
    assert ("vllm:num_requests_running", (("model_name", MODEL),)) in samples


def test_health_follows_draining(server):
    with urllib.request.urlopen(f"{server.url}/health", timeout=30) as r:
        assert r.status == 200
    server.router.draining = True
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{server.url}/health", timeout=30)
        assert e.value.code == 503
        with pytest.raises(openai.APIStatusError) as e:
            server.client.completions.create(model=MODEL, prompt="hi")
        assert e.value.status_code == 503
    finally:
        server.router.draining = False
