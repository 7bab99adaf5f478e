"""vLLM's tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``) on a real loopback
server over the router: the model's own tokenizer, vLLM's shapes and defaults, bad input as a 400
or 404 with JSON, and the requests lm-eval's RemoteTokenizer makes, as it makes them."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kubeinfer.serve.config import RouterSettings
from tests.test_http_api import CHAT_TEMPLATE, MODEL, model_dir, post, start  # noqa: F401 (model_dir: a fixture)

TEXT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    s = start(model_dir, RouterSettings(max_prompt_chars=2000))
    yield s
    s.close()


def tokenizer(server):
    return server.router.models[MODEL].tokenizer


def call(server, path: str, body: dict) -> tuple[int, dict]:
    status, _, out = post(f"{server.url}{path}", json.dumps(body).encode())
    return status, out


def test_tokenize_a_prompt_and_back(server):
    status, out = call(server, "/tokenize", {"model": MODEL, "prompt": TEXT, "return_token_strs": True})
    assert status == 200, out
    ids = tokenizer(server).encode(TEXT)
    assert out == {"count": len(ids), "max_model_len": 256, "tokens": ids,
                   "token_strs": [tokenizer(server).id_to_token(i) for i in ids]}
    plain = call(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})[1]  # the only model by default
    assert plain["tokens"] == tokenizer(server).encode(TEXT, add_special_tokens=False) and plain["token_strs"] is None
    status, out = call(server, "/detokenize", {"model": MODEL, "tokens": plain["tokens"]})
    assert status == 200 and out == {"prompt": TEXT}


def test_tokenize_chat_messages_through_the_template(server):
    messages = [{"role": "user", "content": "hi"}]
    status, out = call(server, "/tokenize", {"messages": messages})
    assert status == 200, out
    assert out["tokens"] == tokenizer(server).encode("<|user|>hi\n<|assistant|>", add_special_tokens=False)
    no_prompt = call(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})[1]
    assert no_prompt["tokens"] == tokenizer(server).encode("<|user|>hi\n", add_special_tokens=False)


def test_a_text_longer_than_the_context_is_counted_not_refused(server):
    status, out = call(server, "/tokenize", {"prompt": "fox " * 400})
    assert status == 200 and out["count"] > out["max_model_len"]


def test_tokenizer_info(server):
    with urllib.request.urlopen(f"{server.url}/tokenizer_info", timeout=30) as r:
        info = json.loads(r.read())
    assert info["chat_template"] == CHAT_TEMPLATE and info["model_max_length"] == 256
    # The tiny checkpoint names its EOS by id only (config.json): the info gives its text.
    assert tokenizer(server).eos_token is None
    assert info["eos_token"] == tokenizer(server).id_to_token(tokenizer(server).eos_token_ids[0])
    assert info["vocab_size"] == tokenizer(server).vocab_size


@pytest.mark.parametrize("path, body, status, message", [
    ("/tokenize", {"prompt": "x" * 2001}, 400, "the prompt has 2001 characters; the limit (max_prompt_chars) is 2000"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "not valid Unicode"),
    ("/tokenize", {"messages": [{"role": "user"}]}, 400, "messages must be a non-empty list"),
    ("/tokenize", {}, 400, "give exactly one of prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model 'nope' is not served here"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens must be integers in [0, "),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
])
def test_bad_input_is_a_clear_error(server, path, body, status, message):
    got, out = call(server, path, body)
    assert got == status and message in out["error"]["message"], out


def test_lm_eval_remote_tokenizer_requests(server):
    """What lm-eval 0.4.13's check_remote_tokenizer_support and RemoteTokenizer send and read, on the
    base URL it derives from ``base_url=.../v1/completions``."""
    base = f"{server.url}/v1/completions".replace("/v1/completions", "")
    with urllib.request.urlopen(f"{base}/tokenizer_info", timeout=30) as r:
        info = json.loads(r.read())
    assert isinstance(info, dict) and "eos_token" in info
    status, out = call(server, "/tokenize", {"prompt": "test", "add_special_tokens": False})
    assert status == 200 and isinstance(out["tokens"], list)
    eos_id = call(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})[1]["tokens"][0]
    assert eos_id in tokenizer(server).eos_token_ids
    assert isinstance(call(server, "/detokenize", {"tokens": out["tokens"]})[1]["prompt"], str)
