"""``/think`` and ``think`` over real HTTP: tokens and thought events stream, deltas land, errors are 4xx."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serving import metric_value, running_server, sse_events, tiny_checkpoint


def sse_json(response: httpx.Response) -> list[tuple[str, dict]]:
    return [(kind, json.loads(data)) for kind, data in sse_events(response.iter_lines())]


@pytest.fixture(scope="module")
def server():
    """The default checkpoint (what `make serve` serves) with one planner worker."""
    with running_server(None, "--planner-workers", "1", timeout=120) as url:
        deadline = 60
        while deadline:  # the worker process loads in the background; wait until it has answered once
            with httpx.stream("POST", url + "/think", json={"prompt": "x", "max_tokens": 2, "deliberation_lag": 0},
                              timeout=60) as r:
                if any(kind == "thought" and ev["outcome"] != "error" for kind, ev in sse_json(r)):
                    break
            deadline -= 1
        yield url


def test_think_streams_tokens_and_thoughts_and_deltas_land(server):
    with httpx.stream("POST", server + "/think", json={"prompt": "The function returns", "max_tokens": 200,
                                                      "temperature": 0, "seed": 1, "min_confidence": 0,
                                                      "plan_every": 8},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_json(r)
    tokens = [ev for kind, ev in events if kind == "token"]
    thoughts = [ev for kind, ev in events if kind == "thought"]
    kind, done = events[-1]
    assert kind == "done" and done["finish_reason"] == "length"
    assert len(tokens) == 200 and [t["index"] for t in tokens] == list(range(200))
    assert thoughts and {"planned_at", "applied_at", "confidence", "a_eff", "delta_norm", "path", "outcome"} <= set(
        thoughts[0])
    applied = [t for t in thoughts if t["outcome"] == "applied"]
    assert applied, [t["outcome"] for t in thoughts]
    assert all(t["a_eff"] == 1.0 and 0 <= t["confidence"] <= 1 for t in applied)  # decision deltas: full strength
    tokens_by_index = {t["index"]: t["token_id"] for t in tokens}
    assert all(tokens_by_index[t["applied_at"]] == t["chosen_token_id"] for t in applied)  # the choice won its step
    think = done["usage"]["think"]
    assert think["plans"] == len(thoughts) and think["applied"] == len(applied)
    metrics = httpx.get(server + "/metrics").text
    assert metric_value(metrics, "crsm_planner_jobs_total", outcome="completed") >= len(applied)
    assert metric_value(metrics, "crsm_planner_injections_total", result="applied") >= len(applied)
    assert metric_value(metrics, "crsm_planner_simulations_total") > 0


def test_openai_client_sees_thinking_in_usage_only(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    stream = client.completions.create(model="tiny", prompt="A list is", max_tokens=40, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"think": {"simulations": 8, "plan_every": 8}, "ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 40 and usage.model_extra["think"]["plans"] >= 4


@pytest.mark.parametrize("body, param", [({"prompt": "x", "simulations": 0}, "simulations"),
                                         ({"prompt": "x", "injection_rate": 2}, "injection_rate"),
                                         ({"prompt": "x", "deliberation_lag": -1}, "deliberation_lag"),
                                         ({"prompt": "x", "verifier": "oracle"}, "verifier"),
                                         ({"prompt": "x", "verifier": "regex"}, "verifier_pattern"),
                                         ({"prompt": "x", "verifier": "regex", "verifier_pattern": "(a"},
                                          "verifier_pattern")])
def test_bad_think_fields_are_400s(server, body, param):
    r = httpx.post(server + "/think", json=body)
    assert r.status_code == 400 and param in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("think, param", [({"verifier": "oracle"}, "think.verifier"),
                                          ({"verifier": "regex", "verifier_pattern": "(a"}, "think.verifier_pattern")])
def test_bad_verifier_fields_on_a_completion_are_400s_naming_the_field(server, think, param):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "think": think})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_the_verifier_verdict_on_the_final_answer_is_in_usage(server):
    """The regex verifier on whatever the model says: the server's verdict is the pattern's on the streamed text."""
    verdicts = {}
    for pattern in (r"[\s\S]*", r"never"):
        with httpx.stream("POST", server + "/think", json={"prompt": "Q: 47+38=\nA: ", "max_tokens": 8,
                                                          "temperature": 0, "stop": ["\n"], "verifier": "regex",
                                                          "verifier_pattern": pattern}, timeout=120) as r:
            events = sse_json(r)
        kind, done = events[-1]
        assert kind == "done"
        verdicts[pattern] = (done["usage"]["think"]["verifier"], done["usage"]["think"]["verified"])
    assert verdicts == {r"[\s\S]*": ("regex", True), "never": ("regex", False)}


@pytest.mark.parametrize("stream", [False, True])
def test_the_verdict_is_in_a_completions_usage_too(server, stream):
    body = {"prompt": "Q: 47+38=\nA: ", "max_tokens": 8, "temperature": 0, "stop": ["\n"], "stream": stream,
            "think": {"verifier": "json", "simulations": 8}}
    if stream:
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as r:
            chunks = [json.loads(data) for _, data in sse_events(r.iter_lines()) if data != "[DONE]"]
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        think = chunks[-1]["usage"]["think"]
    else:
        reply = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
        text, think = reply["choices"][0]["text"], reply["usage"]["think"]
    try:
        json.loads(text)
        parses = True
    except ValueError:
        parses = False
    assert (think["verifier"], think["verified"]) == ("json", parses)


def test_think_without_a_planner_is_a_clear_400(tmp_path):
    with running_server(tiny_checkpoint(tmp_path / "tiny")) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "think": {}})
        assert r.status_code == 400 and r.json()["error"]["code"] == "planner_disabled"
        r = httpx.post(url + "/think", json={"prompt": "x"})
        assert r.status_code == 400


def test_think_events_match_the_documented_models(server):
    """Each /think event parses with its response model (unknown keys fail) and dumps back to the same JSON."""
    from server.responses import ThinkDone, ThinkThought, ThinkToken

    session = httpx.post(server + "/v1/sessions", json={}).json()["id"]
    models = {"token": ThinkToken, "thought": ThinkThought, "done": ThinkDone}
    for extra in ({}, {"session_id": session}):
        with httpx.stream("POST", server + "/think", json={"prompt": "A list is", "max_tokens": 24, "plan_every": 4,
                                                          "ignore_eos": True, **extra}, timeout=120) as r:
            events = sse_json(r)
        assert {kind for kind, _ in events} == {"token", "thought", "done"} and events[-1][0] == "done"
        for kind, payload in events:
            assert models[kind].model_validate(payload).model_dump(mode="json") == payload, kind
        assert events[-1][1].get("session_id") == extra.get("session_id")
