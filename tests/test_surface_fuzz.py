"""A table-driven fuzz of both surfaces (issue 18): odd values in every request field, odd Unicode
(lone surrogates, NUL, RTL marks, emoji), huge numbers, huge bodies, malformed JSON and protobuf.
Every answer is 2xx or a 4xx with a JSON error / a status other than INTERNAL and UNKNOWN, and a
normal request succeeds afterwards. Cases come from a seeded generator, so a failure replays."""

from __future__ import annotations

import json
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2

from kubeinfer.proto import inference_pb2 as pb
from tests.test_bounds import NORMAL, run

CASES = 70  # per surface
ODD_TEXT = ["", "a\ud800b", "\udfff", "\x00", "nul\x00inside", "\u202eRTL\u200f", "🙂" * 50, "e\u0301" * 30,
            "\ufeff", "x" * 5000, "\\", '"', "<|user|>", "{{ 7*7 }}"]
ODD_NUMBERS = [0, -1, 1, 3, 2**31, 2**32 - 1, 2**63, 2**64, -2**70, 10**40, 1e308, -1e-308, 0.5, 1e-9]
ODD_OTHER = [None, True, False, [], {}, [None], [[[]]], {"a": {"b": []}}, [1, "x"], ["a\ud800"]]
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
          "frequency_penalty", "logit_bias", "stream", "stream_options", "user", "top_k", "min_p",
          "repetition_penalty", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
          "skip_special_tokens", "priority", "logprobs", "echo", "best_of", "suffix", "messages",
          "max_completion_tokens", "top_logprobs", "response_format", "tools"]


def odd_value(rng: random.Random):
    pool = rng.choice([ODD_TEXT, ODD_NUMBERS, ODD_OTHER])
    value = rng.choice(pool)
    if rng.random() < 0.15:
        value = [value] * rng.randint(1, 3)
    return value


def http_cases(rng: random.Random) -> list[tuple[str, bytes]]:
    cases = []
    for i in range(CASES):
        chat = rng.random() < 0.4
        body = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
        body.update(max_tokens=2, temperature=0.0)
        for field in rng.sample(FIELDS, rng.randint(1, 4)):
            body[field] = odd_value(rng)
        if body.get("max_tokens") is None or body.get("max_tokens") == 2**31:
            body["max_tokens"] = 2  # keep the valid ones short
        # ensure_ascii escapes a lone surrogate as JSON allows ("\ud800"), which is the point.
        raw = json.dumps(body).encode()
        if i % 10 == 7:
            raw = raw[:rng.randint(0, len(raw) - 1)]  # cut short: not JSON
        elif i % 10 == 9:
            raw = raw.replace(b"2", b"NaN", 1)  # not standard JSON
        cases.append(("/v1/chat/completions" if chat else "/v1/completions", raw))
    cases += [("/v1/completions", b"\xff\xfe\x00garbage"), ("/v1/completions", b""),
              ("/v1/completions", b"[" * 5000 + b"]" * 5000),
              ("/v1/completions", json.dumps({"prompt": "x" * (3 << 20)}).encode()),  # over the body limit
              ("/v1/completions", json.dumps({"prompt": [[1] * 10] * 10}).encode())]
    return cases


def test_http_surface_answers_every_case_with_2xx_or_a_4xx_json_error(tiny_llama_dir):
    cases = http_cases(random.Random(18))
    assert len(cases) >= 50

    async def body(router, http, stub, health, channel):
        out = []
        for path, raw in cases:
            out.append(await http.post(path, content=raw, headers={"content-type": "application/json"}))
        return out, await http.post("/v1/completions", json=NORMAL)
    answers, ok = run(tiny_llama_dir, body)
    for (path, raw), r in zip(cases, answers):
        assert r.status_code < 500, (path, raw[:200], r.status_code, r.text[:300])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and "Traceback" not in error["message"], (raw[:200], error)
    assert sum(r.status_code == 200 for r in answers) >= 3  # the table reaches the engine too
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def grpc_cases(rng: random.Random) -> list[bytes]:
    texts = [t for t in ODD_TEXT if not any(0xD800 <= ord(c) <= 0xDFFF for c in t)]  # protobuf refuses those
    cases = []
    for i in range(CASES):
        if i % 5 == 4:  # bytes that are no GenerateRequest (or carry invalid UTF-8 in a string)
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
            cases.append(rng.choice([raw, b"\x0a\x03\xff\xfe\xfd", b"\x12\x02\xc3\x28"]))
            continue
        req = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))
        which = rng.choice(["prompt", "ids", "chat"])
        if which == "prompt":
            req.prompt = rng.choice(texts + ["hi"])
        elif which == "ids":
            req.prompt_token_ids.ids.extend(rng.choice([[], [1, 2], [2**32 - 1], [5] * 300, [383, 384]]))
        else:
            req.chat.messages.add(role=rng.choice(["user", "nope", "", "system\x00"]), content=rng.choice(texts))
        if rng.random() < 0.3:
            req.model = rng.choice(texts)
        if rng.random() < 0.2:
            req.request_id = rng.choice(texts)
        if rng.random() < 0.3:
            req.priority = rng.choice([-2**31, 2**31 - 1, 0])
        s = req.sampling
        for field in rng.sample(["max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                 "presence_penalty", "frequency_penalty", "seed", "logprobs", "stop",
                                 "stop_token_ids"], rng.randint(1, 4)):
            if field in ("max_tokens", "logprobs"):
                setattr(s, field, rng.choice([0, 1, 2**32 - 1]))
            elif field == "top_k":
                s.top_k = rng.choice([-2**31, -1, 0, 2**31 - 1])
            elif field == "seed":
                s.seed = rng.choice([-2**63, 2**63 - 1, 0])
            elif field == "stop":
                s.stop.extend(rng.sample(texts, 2))
            elif field == "stop_token_ids":
                s.stop_token_ids.extend([rng.choice([0, 383, 384, 2**32 - 1])])
            else:
                setattr(s, field, rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e38, 1.0]))
        cases.append(req.SerializeToString())
    return cases


OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}


def test_grpc_surface_answers_every_case_with_ok_or_a_client_status(tiny_llama_dir):
    cases = grpc_cases(random.Random(18))
    assert len(cases) >= 50

    async def body(router, http, stub, health, channel):
        generate = channel.unary_unary("/kubeinfer.v1.Inference/Generate")
        stream = channel.unary_stream("/kubeinfer.v1.Inference/GenerateStream")
        out = []
        for i, raw in enumerate(cases):
            try:
                if i % 2:
                    out.append([m async for m in stream(raw)])
                else:
                    out.append(await generate(raw))
            except grpc.aio.AioRpcError as e:
                out.append(e)
        for name in ["nope", "\x00", "🙂" * 100, "kubeinfer.v1.Inference.x"]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health.Check(health_pb2.HealthCheckRequest(service=name))
            out.append(e.value)
        ok = await stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=2)))
        return out, ok
    answers, ok = run(tiny_llama_dir, body)
    errors = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    for i, e in enumerate(errors):
        assert e.code() in OK_CODES, (e.code(), e.details())
        assert e.details() and "Traceback" not in e.details()
    assert len(errors) < len(answers) - 3  # the table reaches the engine too
    assert ok.usage.completion_tokens == 2
