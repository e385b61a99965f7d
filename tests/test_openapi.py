"""The HTTP contract: /openapi.json documents every response, and real responses match the documented models.

Real bodies are parsed with the response models (``extra="forbid"``) and dumped back: a key the server adds,
drops or turns from absent into null (or back) fails here. SSE extras: keep-alive pings and shutdown drain.
"""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from pydantic import BaseModel

from server import responses as R
from tests.serving import running_server, running_server_process, sse_events

REF = "#/components/schemas/"
STREAMING = {("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/think")}
GENERATION_ERRORS = {"400", "401", "404", "409", "413", "429", "503"}
ERRORS = {  # statuses each operation can answer with the error body
    ("get", "/health"): {"503"}, ("get", "/ready"): {"503"}, ("get", "/v1/models"): {"401"},
    ("post", "/v1/sessions"): {"400", "401", "413"},
    ("get", "/v1/sessions/{session_id}"): {"401", "404"},
    ("delete", "/v1/sessions/{session_id}"): {"401", "404"},
    ("post", "/v1/sessions/{session_id}/fork"): {"401", "404"},
    ("post", "/v1/completions"): GENERATION_ERRORS, ("post", "/v1/chat/completions"): GENERATION_ERRORS,
    ("post", "/think"): GENERATION_ERRORS,
}


@pytest.fixture(scope="module")
def url(checkpoint):
    with running_server(checkpoint) as base:
        yield base


@pytest.fixture(scope="module")
def spec(url) -> dict:
    r = httpx.get(url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def refs(node) -> set[str]:
    """Component names referenced anywhere under ``node``."""
    if isinstance(node, dict):
        found = {node["$ref"].removeprefix(REF)} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def exact(model: type[BaseModel], payload: dict | str) -> BaseModel:
    """Parse with the response model (unknown keys fail) and check that it dumps back to the same JSON."""
    data = json.loads(payload) if isinstance(payload, str) else payload
    parsed = model.model_validate(data)
    assert parsed.model_dump(mode="json") == data, model.__name__
    return parsed


def sse_data(response: httpx.Response) -> list[tuple[str, str]]:
    return sse_events(response.iter_lines())


# The document ----------------------------------------------------------------------------------------
def test_every_operation_documents_its_200_body(spec):
    components = spec["components"]["schemas"]
    seen = set()
    for method, path, operation in operations(spec):
        seen.add((method, path))
        content = operation["responses"]["200"]["content"]
        if path == "/metrics":
            assert list(content) == ["text/plain; version=0.0.4; charset=utf-8"]
            continue
        for media in content.values():
            names = refs(media["schema"])
            assert names, (method, path, media)
            assert names <= set(components), (method, path, names - set(components))
        assert ((method, path) in STREAMING) == ("text/event-stream" in content), (method, path)
        if (method, path) != ("post", "/think"):
            assert refs(content["application/json"]["schema"]), (method, path)
    assert seen == set(ERRORS) | {("get", "/metrics")}


def test_error_statuses_reference_the_error_body_and_422_is_gone(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["error"] == {"$ref": REF + "ErrorDetail"}
    assert set(spec["components"]["schemas"]["ErrorDetail"]["required"]) == {"message", "type", "param", "code"}
    for method, path, operation in operations(spec):
        documented = {s for s in operation["responses"] if s != "200"}
        assert "422" not in documented, (method, path)
        assert ERRORS.get((method, path), set()) <= documented, (method, path)
        for status in documented:
            assert operation["responses"][status]["content"]["application/json"]["schema"] == {
                "$ref": REF + "ErrorBody"}, (method, path, status)


def test_documented_components_are_the_response_models(spec):
    """The components the responses name are the models the tests below parse real bodies with."""
    components = spec["components"]["schemas"]
    for model in R.STREAM_MODELS + (R.ChatCompletion, R.SessionInfo, R.SessionDeleted, R.ModelList, R.Health,
                                    R.Ready):
        documented = components[model.__name__]
        schema = model.model_json_schema(mode="serialization", ref_template=REF + "{model}")
        assert list(documented["properties"]) == list(schema["properties"]) == list(model.model_fields)
        assert documented.get("required") == schema.get("required") and documented["additionalProperties"] is False
        for name, field in documented["properties"].items():
            assert refs(field) == refs(schema["properties"][name]), (model.__name__, name)


# Real bodies against the models --------------------------------------------------------------------------
def test_json_responses_match_the_models(url):
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(url + path, json={"temperature": 0, "max_tokens": 4, **body}, timeout=60)

    plain = exact(R.Completion, post("/v1/completions", {"prompt": "hi"}).text)
    assert plain.session_id is None and plain.choices[0].logprobs is None and plain.usage.think is None
    exact(R.Completion, post("/v1/completions", {"prompt": "hi", "logprobs": 2}).text)
    as_ids = {"prompt": "hi", "logprobs": 0, "return_tokens_as_token_ids": True}
    exact(R.Completion, post("/v1/completions", as_ids).text)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    exact(R.ChatCompletion, post("/v1/chat/completions", chat).text)
    exact(R.ChatCompletion, post("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2}).text)

    session = exact(R.SessionInfo, httpx.post(url + "/v1/sessions", json={"metadata": {"k": "v"}}).text)
    resumed = exact(R.Completion, post("/v1/completions", {"prompt": "hi", "session_id": session.id}).text)
    assert resumed.session_id == session.id
    exact(R.ChatCompletion, post("/v1/chat/completions", {**chat, "session_id": session.id}).text)
    exact(R.SessionInfo, httpx.get(f"{url}/v1/sessions/{session.id}").text)
    fork = exact(R.SessionInfo, httpx.post(f"{url}/v1/sessions/{session.id}/fork").text)
    exact(R.SessionDeleted, httpx.delete(f"{url}/v1/sessions/{fork.id}").text)
    exact(R.ModelList, httpx.get(url + "/v1/models").text)
    exact(R.Health, httpx.get(url + "/health").text)
    exact(R.Ready, httpx.get(url + "/ready").text)
    for status, response in [(400, post("/v1/completions", {"prompt": 5})),
                             (404, httpx.get(f"{url}/v1/sessions/sess-missing")),
                             (413, httpx.post(url + "/v1/completions", content=b"x" * (9 << 20))),
                             (400, post("/think", {"prompt": "x"}))]:
        assert response.status_code == status
        exact(R.ErrorBody, response.text)


@pytest.mark.parametrize("path, body, model", [
    ("/v1/completions", {"prompt": "hi"}, R.Completion),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1}, R.Completion),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, R.ChatCompletionChunk),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 1},
     R.ChatCompletionChunk),
])
def test_stream_chunks_match_the_models(url, path, body, model):
    session = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    for extra in ({}, {"session_id": session}):
        request = {"max_tokens": 6, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                   **body, **extra}
        with httpx.stream("POST", url + path, json=request, timeout=60) as r:
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            events = sse_data(r)
        assert events[-1] == ("message", "[DONE]") and all(kind == "message" for kind, _ in events)
        chunks = [exact(model, data) for _, data in events[:-1]]
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 6  # chat may stop early
        assert all(c.usage is None for c in chunks[:-1])
        assert all(c.session_id == extra.get("session_id") for c in chunks)


@pytest.mark.parametrize("path, body, model", [
    ("/v1/completions", {"prompt": "hi"}, R.Completion),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1}, R.Completion),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, R.ChatCompletionChunk),
])
def test_continuous_usage_stats_put_usage_on_every_chunk(url, path, body, model):
    """vLLM's extension: each chunk's usage counts the completion tokens so far; the final chunk's usage and
    the usage chunk agree with them."""
    session = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    for extra in ({}, {"session_id": session}, {"session_id": session}):
        request = {"max_tokens": 6, "ignore_eos": True, "stream": True, **body, **extra,
                   "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        with httpx.stream("POST", url + path, json=request, timeout=60) as r:
            events = sse_data(r)
        assert events[-1] == ("message", "[DONE]")
        chunks = [exact(model, data) for _, data in events[:-1]]
        assert all(c.usage is not None for c in chunks)
        final = chunks[-1].usage
        # 6 tokens, unless the sampled reply ended its chat turn first (ignore_eos does not cover the turn's end)
        expected = 6 if chunks[-2].choices[0].finish_reason == "length" else final.completion_tokens
        assert final.completion_tokens == expected <= 6 and chunks[-2].usage == final  # finish chunk, usage chunk
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-3] <= 6
        for c in chunks:
            assert (c.usage.prompt_tokens, c.usage.prompt_tokens_details) == (final.prompt_tokens,
                                                                               final.prompt_tokens_details)
            assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        if model is R.ChatCompletionChunk:
            assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage.completion_tokens == 0
        if "session_id" in extra:
            assert final.prompt_tokens > final.prompt_tokens_details.cached_tokens
    without = dict(request, stream_options={"continuous_usage_stats": True}, session_id=None)
    with httpx.stream("POST", url + path, json=without, timeout=60) as r:
        chunks = [exact(model, data) for _, data in sse_data(r)[:-1]]
    assert chunks[-1].choices and all(c.usage is not None for c in chunks)  # no usage chunk without include_usage


# SSE keep-alive and shutdown -------------------------------------------------------------------------------
def test_keep_alive_pings_and_one_final_event(checkpoint):
    openai = pytest.importorskip("openai")
    with running_server(checkpoint, "--sse-ping-seconds", "0.01") as base:
        body = {"prompt": "ping me", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
        assert any(line.startswith(":") for line in lines)  # the comment lines proxies see
        data = [line for line in lines if not line.startswith(":")]
        assert all(line.startswith("data: ") for line in data) and data[-1] == "data: [DONE]"
        chunks = [exact(R.Completion, line[len("data: "):]) for line in data[:-1]]
        assert [c.choices[0].finish_reason for c in chunks].count("length") == 1
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")  # comments do not disturb a real client
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=200, stream=True, extra_body={"ignore_eos": True})
        reasons = [c.choices[0].finish_reason for c in stream]
        assert reasons[-1] in ("stop", "length") and reasons.count(None) == len(reasons) - 1


def test_shutdown_drains_then_ends_streams_with_a_final_event(checkpoint):
    """SIGTERM: a stream that cannot finish within the drain time is cancelled and still ends properly."""
    with running_server_process(checkpoint, "--drain-timeout", "1") as (base, proc):
        body = {"prompt": "forever", "max_tokens": 30000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert len(rest) > 2 and rest[-1] == "data: [DONE]"  # tokens while draining, the final chunk, [DONE]
        last = exact(R.Completion, rest[-2][len("data: "):])
        assert last.choices[0].finish_reason == "abort"
        assert proc.wait(timeout=30) == 0  # drained (server/drain.py): a clean exit
