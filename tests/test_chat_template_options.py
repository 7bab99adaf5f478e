"""vLLM's chat extras that decide how messages are rendered: ``add_generation_prompt``,
``continue_final_message`` and ``chat_template_kwargs`` (Qwen3's ``enable_thinking`` is the common
one), on ``/v1/chat/completions`` and ``/tokenize`` alike; and ``GET /v1/models/{id}`` (the openai
SDK's ``models.retrieve``). A real loopback server over the router, driven by the openai client."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
import tokenizers

from kubeinfer.local.router import build_local_router
from kubeinfer.serve.config import AppConfig, ModelSpec, RouterSettings
from kubeinfer.worker.tokenizer import ChatTemplate, Tokenizer
from tests.test_http_api import MODEL, HTTPServer, post

# The test model's template, plus a variable of its own as Qwen3's enable_thinking is.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
            "<think></think>{% endif %}{% endif %}")
ASK = [{"role": "user", "content": "Count to five"}]
PREFILL = ASK + [{"role": "assistant", "content": "one two"}]
GREEDY = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-template-vars")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    spec = ModelSpec(name=MODEL, uri=str(path), max_model_len=256, engine={"num_kv_blocks": 64}, num_replicas=1)
    s = HTTPServer(build_local_router(AppConfig(models=[spec], router=RouterSettings())))
    yield s
    s.close()


def rendered(server, messages, **options) -> str:
    """The prompt text a chat request renders, from /tokenize with the same options."""
    status, _, out = post(f"{server.url}/tokenize", json.dumps({"messages": messages, **options}).encode())
    assert status == 200, out
    return server.router.models[MODEL].tokenizer.decode(out["tokens"], skip_special_tokens=False)


def chat(server, messages, **kwargs):
    extra = {**GREEDY["extra_body"], **kwargs}
    return server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5,
                                                 extra_body=extra)


def completion_of(server, text: str) -> str:
    return server.client.completions.create(model=MODEL, prompt=text, **GREEDY).choices[0].text


def rendered_text(messages, **options) -> str:
    """The template alone (a tokenizer with no vocabulary: rendering does not tokenize)."""
    tok = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                    bos_token_id=None, eos_token_ids=[], chat_template=TEMPLATE)
    return tok.apply_chat_template(messages, options=ChatTemplate(**options))


def test_the_options_render_what_they_say():
    assert rendered_text(ASK) == "<|user|>Count to five\n<|assistant|>"
    assert rendered_text(ASK, add_generation_prompt=False) == "<|user|>Count to five\n"
    assert rendered_text(ASK, kwargs={"enable_thinking": False}) == "<|user|>Count to five\n<|assistant|><think></think>"
    assert rendered_text(PREFILL, add_generation_prompt=False, continue_final_message=True) == \
        "<|user|>Count to five\n<|assistant|>one two"


@pytest.mark.parametrize("options", [{}, {"add_generation_prompt": False},
                                     {"chat_template_kwargs": {"enable_thinking": False}},
                                     {"add_generation_prompt": False, "continue_final_message": True}])
def test_a_chat_request_replies_to_the_prompt_its_options_render(server, options):
    messages = PREFILL if options.get("continue_final_message") else ASK
    text = rendered(server, messages, **options)
    out = chat(server, messages, **options)
    assert out.choices[0].message.content == completion_of(server, text)
    assert out.usage.prompt_tokens == len(server.router.models[MODEL].tokenizer.encode(text))


@pytest.mark.parametrize("options, param, message", [
    ({"continue_final_message": True}, "continue_final_message",
     "continue_final_message and add_generation_prompt cannot both be true"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "chat_template_kwargs may not set messages"),
    ({"add_generation_prompt": False, "continue_final_message": True}, None,
     "continue_final_message needs a final assistant message"),  # the last message is the user's
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs", "chat_template_kwargs"),
])
def test_bad_options_are_a_400_naming_the_field(server, options, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server, ASK, **options)
    assert message in e.value.body["message"]
    if param:
        assert e.value.body["param"] == param
    status, _, out = post(f"{server.url}/tokenize", json.dumps({"messages": ASK, **options}).encode())
    assert status == 400 and message in out["error"]["message"]


def test_models_retrieve(server):
    card = server.client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    assert card.model_dump() == next(m.model_dump() for m in server.client.models.list().data)
    with pytest.raises(openai.NotFoundError) as e:
        server.client.models.retrieve("org/nope")
    assert "model 'org/nope' is not served here" in e.value.body["message"]
