"""``/v1/completions`` with a list of prompts (OpenAI's batch form; lm-eval's local-completions sends it
at ``batch_size`` > 1): each prompt gets ``n`` choices, numbered ``p * n + j`` as OpenAI and vLLM
number them, each exactly what the prompt alone would get; usage is summed; the whole list is
bounded and validated before any job runs. A real loopback uvicorn server over the router and an
in-process engine, driven by the official ``openai`` client where it can say it."""

from __future__ import annotations

import json
from operator import itemgetter

import pytest

from kubeinfer.serve.config import RouterSettings
from tests.test_http_api import (MODEL, StepGate, model_dir, post, server, start,  # noqa: F401 (fixtures)
                                 wait_for)

PROMPTS = ["The quick brown fox", "Kubernetes schedules pods", "Once upon a time"]
GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


def tokenizer(server):
    return server.router.models[MODEL].tokenizer


def alone(server, prompt, **kwargs):
    return server.client.completions.create(model=MODEL, prompt=prompt, **{**GREEDY, **kwargs})


def test_each_prompt_gets_its_own_choices_numbered_prompt_by_prompt(server):
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS, n=2, **GREEDY)
    assert [c.index for c in out.choices] == list(range(2 * len(PROMPTS)))
    for p, prompt in enumerate(PROMPTS):
        single = alone(server, prompt).choices[0].text
        assert [c.text for c in out.choices[2 * p:2 * p + 2]] == [single, single]  # greedy: both choices alike
        assert all(c.finish_reason == "length" for c in out.choices[2 * p:2 * p + 2])
    prompt_tokens = sum(len(tokenizer(server).encode(p)) for p in PROMPTS)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 6 * 2 * len(PROMPTS))
    assert out.usage.total_tokens == prompt_tokens + 6 * 2 * len(PROMPTS)
    assert out.id.startswith("cmpl-")


def test_streaming_a_list_of_prompts(server):
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPTS, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 6 * len(PROMPTS)
    assert usage.prompt_tokens == sum(len(tokenizer(server).encode(p)) for p in PROMPTS)
    assert len({c.id for c in chunks}) == 1
    for p, prompt in enumerate(PROMPTS):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == p]
        assert "".join(c.text for c in mine) == alone(server, prompt).choices[0].text
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])


def test_echo_gives_each_choice_its_own_prompt(server):
    out = server.client.completions.create(model=MODEL, prompt=PROMPTS, echo=True, **GREEDY)
    for choice, prompt in zip(out.choices, PROMPTS):
        assert choice.text == prompt + alone(server, prompt).choices[0].text


def test_lm_eval_batched_loglikelihood_request(server):
    """The payload lm-eval 0.4's local-completions sends at batch_size > 1 (token-id prompts, echo,
    logprobs 1, max_tokens 1), parsed as its ``parse_logprobs`` parses it: the choices sorted by
    index and zipped with the context lengths. Each prompt's scores are the ones it gets alone."""
    ids = [tokenizer(server).encode(p) for p in PROMPTS]
    payload = {"model": MODEL, "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    status, _, body = post(f"{server.url}/v1/completions", json.dumps(payload).encode())
    assert status == 200, body
    choices = sorted(body["choices"], key=itemgetter("index"))
    assert len(choices) == len(PROMPTS)
    for choice, prompt_ids in zip(choices, ids):
        status, _, single = post(f"{server.url}/v1/completions", json.dumps({**payload, "prompt": [prompt_ids]}).encode())
        assert status == 200, single
        ctxlen = len(prompt_ids) - 2
        got, want = choice["logprobs"], single["choices"][0]["logprobs"]
        assert len(got["token_logprobs"]) == len(prompt_ids) + 1 and got["token_logprobs"][0] is None
        assert got["token_logprobs"][ctxlen:-1] == pytest.approx(want["token_logprobs"][ctxlen:-1], abs=1e-4)
        assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt must not be empty"),
    (["fine", "x " * 100_000], "prompt"),
    ([[1, 2], []], "empty"),
    (["fine", [1, 2]], "Input should be a valid string"),  # one list holds one kind
])
def test_a_bad_prompt_in_the_list_is_a_400_for_the_request(server, prompt, message):
    status, _, body = post(f"{server.url}/v1/completions", json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode())
    assert status == 400 and message in body["error"]["message"], body


def test_more_jobs_than_the_router_holds_is_a_400_before_any_prompt_is_read(model_dir):  # noqa: F811
    s = start(model_dir, RouterSettings(max_in_flight=2, max_queued=1))
    try:
        for prompt in (["a", "b"], ["a", "x " * 100_000]):  # the count is refused first, the long prompt unread
            status, _, body = post(f"{s.url}/v1/completions", json.dumps(
                {"model": MODEL, "prompt": prompt, "n": 2, "max_tokens": 2}).encode())
            assert status == 400, body
            assert "asks for 4 jobs (its prompts x n), but this router holds at most 3" in body["error"]["message"]
        out = s.client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=2)
        assert len(out.choices) == 3  # three jobs fit
    finally:
        s.close()


def test_a_client_that_leaves_aborts_every_prompts_jobs(server, monkeypatch):
    """Two prompts x n 2: four jobs in the engine; the client closes the stream after the first
    chunk, and the router and the engine drop all four."""
    gate = StepGate(server.engine(), monkeypatch)
    try:
        stream = server.client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, stream=True, temperature=1.0,
                                                  max_tokens=200, extra_body={"ignore_eos": True})
        next(iter(stream))
        wait_for(lambda: server.engine().stats().num_requests_running == 4, "every prompt's choices to run")
        gate.opened.clear()  # at most one more step: no job can finish on its own
        stream.close()
        wait_for(lambda: server.router.admission.in_flight == 0, "the router to drop the jobs")
        gate.opened.set()
        wait_for(lambda: server.engine().stats().num_requests_running == 0, "the engine to abort the jobs")
        assert server.engine().stats().num_requests_waiting == 0
    finally:
        gate.opened.set()
