"""Hostile input over real HTTP: invalid Unicode, loose types, absurd numbers. Each is a 400 naming the field,
nothing is created or generated before the request is known valid, and the server stays up."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.serving import metric_value, running_server

SURROGATE = "\ud800"  # valid JSON ("\ud800"), not valid Unicode
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def url(checkpoint):
    with running_server(checkpoint) as base:
        yield base


def post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    """``body`` as JSON the way a hostile client writes it: surrogates as ``\\ud800`` escapes, NaN as ``NaN``."""
    return httpx.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"},
                      timeout=30, **kwargs)


def sessions(url: str) -> float:
    return metric_value(httpx.get(url + "/metrics").text, "crsm_sessions_cached")


def assert_400(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"prompt": ["ok" + SURROGATE]}, "prompt.0"),
    ("/v1/completions", {"prompt": "x", "stop": SURROGATE}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["fine", "a" + SURROGATE]}, "stop.1"),
    ("/v1/completions", {"prompt": "x", "model": SURROGATE}, "model"),
    ("/v1/completions", {"prompt": "x", "session_id": SURROGATE}, "session_id"),
    ("/v1/completions", {"prompt": "x", "user": SURROGATE}, "user"),
    (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content.0.text"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "stop": [SURROGATE]}, "stop.0"),
    ("/think", {"prompt": SURROGATE}, "prompt"),
    ("/v1/sessions", {"metadata": {"k": SURROGATE}}, "metadata.k"),
])
def test_unpaired_surrogates_are_400s_naming_the_field(url, path, body, param):
    err = assert_400(post(url, path, body), param)
    assert "Unicode" in err["message"]


def test_a_session_is_not_created_by_a_refused_request(url):
    before = sessions(url)
    assert post(url, "/v1/sessions", {"metadata": {"k": SURROGATE}}).status_code == 400
    r = post(url, "/v1/sessions", {"metadata": {SURROGATE: "v"}})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata.")
    r = post(url, "/v1/sessions", {"metadata": {"k": "v" * (17 << 10)}})  # over the store's 16 KiB
    assert r.status_code == 413 and r.json()["error"]["param"] == "metadata"
    assert post(url, "/v1/sessions", {"metadata": {str(i): "v" for i in range(65)}}).status_code == 400
    assert sessions(url) == before
    assert post(url, "/v1/sessions", {"metadata": {"k": "v"}}).status_code == 200
    assert sessions(url) == before + 1


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "true"}, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": False}, "temperature"),
    ("/v1/completions", {"prompt": "x", "seed": "7"}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": [True, 1]}, "prompt.0"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ("/think", {"prompt": "x", "decay": False}, "decay"),
    ("/think", {"prompt": "x", "wait": "no"}, "wait"),
    ("/think", {"prompt": "x", "simulations": "8"}, "simulations"),
    ("/v1/completions", {"prompt": "x", "think": {"plan_every": 4.5}}, "think.plan_every"),
])
def test_types_are_strict(url, path, body, param):
    assert_400(post(url, path, body), param)


def test_json_numbers_still_work(url):
    """An int where a float is expected is a JSON number like any other (the openai client sends these), and
    an integral float is an integer as JSON Schema counts it (what /openapi.json promises)."""
    body = {"prompt": "x", "max_tokens": 2, "temperature": 1, "top_p": 1, "repetition_penalty": 1}
    assert post(url, "/v1/completions", body).status_code == 200
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2.0, "think": None, "seed": 7.0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    chat = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2, "temperature": 0}
    assert post(url, CHAT, chat).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "top_k": 1 << 40}, "top_k"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1 << 40}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**400}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": 1 << 64}, "seed"),
    ("/v1/completions", {"prompt": "x", "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": float("inf")}, "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": 10**400}, "temperature"),
    ("/v1/completions", {"prompt": [1 << 40]}, "prompt.0"),
    ("/v1/completions", {"prompt": [-1]}, "prompt.0"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 9}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 1025}, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "m" * 257}, "model"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1 << 40},
     "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}] * 4097}, "messages"),
    ("/think", {"prompt": "x", "time_budget_ms": float("inf")}, "time_budget_ms"),
    ("/think", {"prompt": "x", "min_confidence": float("nan")}, "min_confidence"),
])
def test_numbers_and_lists_are_bounded(url, path, body, param):
    assert_400(post(url, path, body), param)


def test_the_engine_still_names_model_dependent_limits(url):
    """Within the schema's bounds, the engine refuses what depends on the model: top_k beyond the vocabulary,
    max_tokens beyond the context."""
    assert_400(post(url, "/v1/completions", {"prompt": "x", "top_k": 1 << 20}), "top_k")
    assert_400(post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1 << 31}), "max_tokens")


# Auth and HEAD ---------------------------------------------------------------------------------------------
def test_auth_is_exact_challenged_and_guards_metrics_and_docs(checkpoint):
    with running_server(checkpoint, "--api-key", "key-a,key-b", "--metrics-api-key", "mkey") as base:
        def get(path: str, auth: str | None = None, method: str = "GET") -> httpx.Response:
            return httpx.request(method, base + path, headers={"Authorization": auth} if auth else {}, timeout=30)

        for path, auth in [("/v1/models", None), ("/v1/models", "Bearer  key-a"), ("/v1/models", "Bearer key-c"),
                           ("/v1/models", "Basic key-a"), ("/v1/models", "Bearer key-a key-b"),
                           ("/metrics", None), ("/metrics", "Bearer key-a"), ("/metrics", "Bearer  mkey"),
                           ("/openapi.json", None), ("/docs", None), ("/redoc", None), ("/openapi.json", "Bearer mkey")]:
            r = get(path, auth)
            assert r.status_code == 401, (path, auth)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["code"] == "invalid_api_key"
        r = post(base, "/v1/completions", {"prompt": "x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert get("/v1/models", "Bearer key-b").status_code == 200
        assert get("/metrics", "Bearer mkey").text.startswith("#")
        assert get("/openapi.json", "Bearer key-a").json()["paths"]
        assert get("/docs", "Bearer key-a").status_code == get("/redoc", "Bearer key-b").status_code == 200
        assert get("/health").status_code == get("/ready").status_code == 200  # probes stay open
        assert get("/metrics", method="HEAD").status_code == 401
        assert get("/metrics", "Bearer mkey", method="HEAD").status_code == 200


def test_head_answers_every_get_route_without_a_body(url):
    spec = httpx.get(url + "/openapi.json").json()
    gets = [path for path, item in spec["paths"].items() if "get" in item and "{" not in path]
    assert {"/health", "/ready", "/metrics", "/v1/models"} <= set(gets)
    before = metric_value(httpx.get(url + "/metrics").text, "crsm_request_errors_total") \
        if "crsm_request_errors_total{" in httpx.get(url + "/metrics").text else 0.0
    for path in gets + ["/openapi.json", "/docs", "/redoc"]:
        get, head = httpx.get(url + path), httpx.head(url + path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    head = httpx.head(url + "/v1/sessions/sess-missing")
    assert head.status_code == 404 and head.content == b""
    text = httpx.get(url + "/metrics").text
    assert metric_value(text, "crsm_request_errors_total") == before + 1  # the 404 only
    assert not any("head" in item for item in spec["paths"].values())  # the document lists the GETs


# Property: any JSON body -------------------------------------------------------------------------------------
_hostile_strings = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "true", "null", "0x10", " 4 ",
                                    "\ud800", "a\udfff", "\ud83d\ude00\ud800", "", "user", "tiny", "text"])
_text = st.one_of(st.text(st.characters(codec=None, exclude_categories=()), max_size=8), _hostile_strings,
                  st.builds(lambda a, b: a + "\udc80" + b, st.text(max_size=3), st.text(max_size=3)))
_numbers = (st.integers() | st.sampled_from([10**400, -10**400, 2**31, 2**63, -2**63 - 1, 1 << 20])
            | st.floats(allow_nan=True, allow_infinity=True))
_json = st.recursive(st.none() | st.booleans() | _numbers | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_unit = st.floats(0, 1) | st.integers(0, 1)
_part = st.fixed_dictionaries({"type": st.just("text"), "text": _text})
_plausible = {  # values of the right shape (strings possibly invalid Unicode), so that requests get past the types
    "prompt": _text | st.lists(st.integers(0, 300), max_size=4) | st.lists(_text, min_size=1, max_size=1),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": _text | st.lists(_part, max_size=2)}),
                         min_size=1, max_size=3),
    "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4), "temperature": _unit,
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 300), "seed": st.integers(0, 2**63 - 1),
    "stop": _text | st.lists(_text, max_size=3), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    "logprobs": st.integers(0, 3) | st.booleans(), "top_logprobs": st.integers(0, 3), "model": st.just("tiny") | _text,
    "user": _text, "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(),
    "return_tokens_as_token_ids": st.booleans(), "metadata": st.dictionaries(_text, _text, max_size=3),
    "think": st.fixed_dictionaries({}, optional={"simulations": st.integers(1, 8), "decay": _unit}),
    "simulations": st.integers(1, 8), "decay": _unit, "wait": st.booleans(), "plan_every": st.integers(1, 8),
}
_REQUIRED = {"/v1/completions": ("prompt",), CHAT: ("messages",), "/think": ("prompt",), "/v1/sessions": ()}


@st.composite
def _requests(draw) -> tuple[str, dict]:
    """A request of one endpoint: its required fields of the right shape (strings may be invalid Unicode), and
    up to 4 more fields, each a plausible value (twice as likely) or any JSON at all (random types, invalid
    Unicode, huge numbers, NaN), sometimes under an unknown key."""
    path = draw(st.sampled_from(sorted(_REQUIRED)))
    body = {key: draw(_plausible[key]) for key in _REQUIRED[path]}
    for key in draw(st.lists(st.sampled_from(sorted(_plausible)) | _text, max_size=4, unique=True)):
        body[key] = draw(st.one_of(_plausible[key], _plausible[key], _json) if key in _plausible else _json)
    return path, body


def _short(body: dict) -> dict:
    """Keep accepted generations short: a valid max_tokens is cut to 4, an absent one is 4."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if type(value) is int and value > 4:
            body[key] = 4
    body.setdefault("max_tokens", 4)
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=_requests(), with_session=st.booleans())
def test_any_json_body_gets_a_2xx_or_an_openai_4xx_and_creates_nothing(url, request, with_session):
    """Random types per field, invalid Unicode, huge numbers, NaN: never a 5xx; a 4xx has the OpenAI error
    body with a message, and a request refused with a 4xx created no session."""
    path, body = request
    if with_session and path != "/v1/sessions" and "session_id" not in body:
        body["session_id"] = _SESSION.setdefault(url, httpx.post(url + "/v1/sessions", json={}).json()["id"])
    before = sessions(url)
    r = post(url, path, _short(body) if path != "/v1/sessions" else body)
    assert r.status_code < 500, (r.status_code, r.text)
    event(f"{path} {r.status_code}")  # --hypothesis-show-statistics: how many got through
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
        assert sessions(url) == before, (path, body, r.text)
    elif path == "/v1/sessions":
        assert sessions(url) == before + 1


_SESSION: dict[str, str] = {}
