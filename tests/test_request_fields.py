"""No silent ignores (issue 23, part 1): a field the server does not implement is a 400 naming it, on every
generation route, over real HTTP; the few accepted for compatibility without effect are declared and documented.

The fields below are what clients send to OpenAI-compatible servers and this one does not do (yet): each used to
get a 200 and no effect.
"""

from __future__ import annotations

import httpx
import pytest

UNSUPPORTED = {
    "response_format": {"type": "json_object"},
    "guided_json": {"type": "object"},
    "structured_outputs": {"json": {"type": "object"}},
    "regex": "a+",
    "ebnf": "root ::= 'a'",
    "grammar": "root ::= 'a'",
    "json_schema": {"type": "object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "logit_bias": {"65": -100},
    "best_of": 2,
    "use_beam_search": True,
    "min_p": 0.1,
    "min_tokens": 4,
    "stop_token_ids": [10],
    "include_stop_str_in_output": True,
    "prompt_logprobs": 1,
    "suffix": "tail",
    "add_generation_prompt": False,
    "continue_final_message": True,
    "chat_template_kwargs": {"enable_thinking": False},
    "priority": 1,
    "a_field_nobody_defined": 1,
}
ROUTES = {
    "/v1/completions": {"prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("field", UNSUPPORTED)
def test_an_unsupported_field_is_a_400_naming_it(url, route, field):
    r = httpx.post(url + route, json={**ROUTES[route], field: UNSUPPORTED[field]}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if field == "response_format":  # a declared field: its unsupported value is named
        assert error["param"] == "response_format.type" and error["code"] == "invalid_value"
    else:
        assert error["param"] == field and error["code"] == "unsupported_parameter"
        assert field in error["message"] and "not supported" in error["message"]


def test_think_refuses_unsupported_fields_too(url):
    r = httpx.post(url + "/think", json={"prompt": "x", "max_tokens": 2, "logit_bias": {"65": -100}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("message, param", [
    ({"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]},
     "messages.1.tool_calls"),
    ({"role": "user", "content": "hi", "name": "bob"}, "messages.1.name"),
    ({"role": "tool", "content": "42", "tool_call_id": "c"}, "messages.1.role"),
])
def test_message_fields_are_not_dropped(url, message, param):
    body = {"messages": [{"role": "user", "content": "hello"}, message], "max_tokens": 2}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_compatibility_fields_without_effect_are_accepted_and_change_nothing(url):
    base = {"prompt": "same output", "max_tokens": 6, "temperature": 0}
    plain = httpx.post(url + "/v1/completions", json=base, timeout=30).json()
    compat = {**base, "user": "u-1", "store": False, "metadata": {"run": "a"}, "response_format": {"type": "text"}}
    answered = httpx.post(url + "/v1/completions", json=compat, timeout=30).json()
    assert answered["choices"][0]["text"] == plain["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "store": True, "user": "u-1"}
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=30).status_code == 200
    too_many = {**base, "metadata": {str(i): "v" for i in range(17)}}
    assert httpx.post(url + "/v1/completions", json=too_many, timeout=30).json()["error"]["param"] == "metadata"


def test_the_openapi_schema_closes_the_request_bodies_and_describes_the_compatibility_fields(url):
    components = httpx.get(url + "/openapi.json").json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "ThinkRequest", "ChatMessage"):
        assert components[name].get("additionalProperties") is False, name
    properties = components["CompletionRequest"]["properties"]
    for field in ("user", "store", "metadata"):
        assert "no effect" in properties[field]["description"], field


def test_the_openai_client_gets_a_bad_request_error_naming_the_field(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       logit_bias={"65": -100})
    assert refused.value.body["param"] == "logit_bias"
