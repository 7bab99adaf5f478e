"""OpenAI's Responses API (``POST /v1/responses``) over the chat path, driven by the official
``openai`` client: its ``responses.create`` and its ``responses.stream`` helper, which checks the
events' order and builds the final Response from them. Each reply is the chat path's for the same
conversation; bad input is a 400 naming the field."""

from __future__ import annotations

import openai
import pytest

from tests.test_http_api import (MODEL, StepGate, fail_after_two_steps, model_dir,  # noqa: F401 (fixtures)
                                 server, wait_for)

FORMAT = {"format": {"type": "json_schema", "name": "pick", "strict": True, "schema": {
    "type": "object", "properties": {"a": {"enum": ["xy", "z"]}}, "required": ["a"], "additionalProperties": False}}}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "rome"]}}, "required": ["city"],
    "additionalProperties": False}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]


def chat_text(server, messages, **kwargs):
    out = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)
    return out.choices[0].message, out.usage


def test_a_text_reply_is_the_chat_reply_and_stops_at_max_output_tokens(server):
    r = server.client.responses.create(model=MODEL, input="hello", max_output_tokens=5, temperature=0)
    message, usage = chat_text(server, [{"role": "user", "content": "hello"}], max_tokens=5)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == message.content and r.output[0].role == "assistant"
    assert (r.usage.input_tokens, r.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"


def test_instructions_and_message_items_are_the_chat_messages(server):
    r = server.client.responses.create(
        model=MODEL, instructions="Be brief.", max_output_tokens=4, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "The quick "},
                                            {"type": "input_text", "text": "brown fox"}]},
               {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
               {"role": "user", "content": "again"}])
    message, usage = chat_text(server, [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "The quick brown fox"},
                                        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}],
                               max_tokens=4)
    assert r.output_text == message.content and r.usage.input_tokens == usage.prompt_tokens


def test_the_stream_helper_builds_the_same_response(server):
    whole = server.client.responses.create(model=MODEL, input="hello", text=FORMAT, temperature=0,
                                           max_output_tokens=50)
    assert whole.status == "completed" and whole.output_text in ('{"a": "xy"}', '{"a": "z"}')
    with server.client.responses.stream(model=MODEL, input="hello", text=FORMAT, temperature=0,
                                        max_output_tokens=50) as stream:
        events = [e for e in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens and final.id == events[0].response.id
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_and_its_output_round_trip(server, stream):
    kwargs = dict(model=MODEL, input="Weather in Paris?", tools=TOOLS, temperature=0, max_output_tokens=60,
                  tool_choice={"type": "function", "name": "get_weather"})
    if stream:
        with server.client.responses.stream(**kwargs) as s:
            kinds = [e.type for e in s]
            r = s.get_final_response()
        assert kinds[2:6] == ["response.output_item.added", "response.function_call_arguments.delta",
                              "response.function_call_arguments.done", "response.output_item.done"]
    else:
        r = server.client.responses.create(**kwargs)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.arguments in ('{"city": "paris"}', '{"city": "rome"}')
    follow = server.client.responses.create(model=MODEL, tools=TOOLS, temperature=0, max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    _, usage = chat_text(server, tools=CHAT_TOOLS, max_tokens=4, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}])
    assert follow.usage.input_tokens == usage.prompt_tokens


@pytest.mark.parametrize("extra, param, message", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "responses are not stored"),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools are served"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
     "content part of type 'input_image'"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "input[0] is of type 'reasoning'"),
    ({"text": {"format": {"type": "yaml"}}}, "text", "text.format.type must be"),
    ({"top_logprobs": 2}, "top_logprobs", "not supported"),
    ({"temperature": -1}, None, "temperature must be >= 0"),
])
def test_bad_input_is_a_400_naming_the_field(server, extra, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.responses.create(**{"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra})
    assert message in e.value.body["message"]
    if param:
        assert e.value.body["param"] == param


def test_an_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError):
        server.client.responses.create(model="nope", input="hi")


def test_an_empty_reply_still_has_its_message_item():
    """A reply that ends at once (EOS first) is an empty message, streamed or not; a reply of calls
    alone has no message item."""
    from kubeinfer.router.responses_api import ResponseRenderer
    from kubeinfer.router.responses_request import ResponsesRequest
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}}
    renderer = ResponseRenderer(ResponsesRequest(input="hi"), "r1", MODEL, 0)
    whole = renderer.response({"choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}],
                               "usage": usage})
    assert [(o["type"], o["content"][0]["text"]) for o in whole["output"]] == [("message", "")]
    stop = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    assert renderer.feed([stop]) == []
    kinds = [e.split("\n")[0] for e in renderer.finish(usage)]
    assert kinds == ["event: response.output_item.added", "event: response.content_part.added",
                     "event: response.output_text.done", "event: response.content_part.done",
                     "event: response.output_item.done", "event: response.completed"]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    only_calls = ResponseRenderer(ResponsesRequest(input="hi"), "r2", MODEL, 0).response(
        {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]},
                      "finish_reason": "tool_calls"}], "usage": usage})
    assert [o["type"] for o in only_calls["output"]] == ["function_call"]


def test_a_client_that_leaves_the_stream_aborts_the_request(server, monkeypatch):
    gate = StepGate(server.engine(), monkeypatch)
    try:
        stream = server.client.responses.create(model=MODEL, input="hello", stream=True, temperature=0,
                                                 max_output_tokens=200, extra_body={"ignore_eos": True})
        kinds = [next(iter(stream)).type for _ in range(3)]
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added"]
        gate.opened.clear()  # at most one more step: the reply cannot finish on its own
        stream.close()
        wait_for(lambda: server.router.admission.in_flight == 0, "the router to drop the request")
        gate.opened.set()
        wait_for(lambda: server.engine().stats().num_requests_running == 0, "the engine to abort the request")
    finally:
        gate.opened.set()


def test_an_engine_failure_mid_stream_is_an_error_event(server, monkeypatch):
    fail_after_two_steps(server, monkeypatch)
    events = list(server.client.responses.create(model=MODEL, input="hello", stream=True, temperature=0,
                                                 max_output_tokens=50, extra_body={"ignore_eos": True}))
    assert events[-1].type == "error" and "injected failure" in events[-1].message
    assert "response.completed" not in [e.type for e in events]
    monkeypatch.undo()
    assert server.client.responses.create(model=MODEL, input="hello", max_output_tokens=3).usage.output_tokens == 3
