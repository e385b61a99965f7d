"""Integration tests: a real uvicorn on loopback, driven with httpx and the openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.serving import complete, ids_request, metric_value, running_server, token_ids

openai = pytest.importorskip("openai")


# Shapes ------------------------------------------------------------------------------
def test_openai_client_completions_and_chat(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True})
        if c.choices)
    assert text == out.choices[0].text
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True, temperature=0,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sse_wire_format(url):
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 4, "stream": True, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert payloads[0]["id"].startswith("cmpl-") and payloads[0]["object"] == "text_completion"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_token_id_prompts_and_logprobs(url):
    as_text = complete(url, **ids_request("hey", 5))
    as_ids = complete(url, **ids_request(list(b"hey"), 5))
    assert token_ids(as_text) == token_ids(as_ids)
    top = complete(url, prompt="hey", max_tokens=3, logprobs=3)["choices"][0]["logprobs"]
    assert len(top["top_logprobs"]) == 3 and all(len(t) <= 3 for t in top["top_logprobs"])
    assert all(lp <= 0 for lp in top["token_logprobs"])


def test_seed_makes_sampling_repeatable(url):
    a = complete(url, **ids_request("seeded", 12, temperature=1.0, seed=7))
    b = complete(url, **ids_request("seeded", 12, temperature=1.0, seed=7))
    c = complete(url, **ids_request("seeded", 12, temperature=1.0, seed=8))
    assert token_ids(a) == token_ids(b) != token_ids(c)


def test_stop_string_across_tokens_is_cut(url):
    """A 2-character stop string spans two byte tokens; the text stops right before it."""
    for prompt in ("stop me", "halt", "the end", "abc", "zzz", "0123"):
        full = complete(url, prompt=prompt, max_tokens=32)["choices"][0]["text"]
        windows = [i for i in range(1, len(full) - 1) if "\ufffd" not in full[i : i + 2]]
        if windows:
            break
    else:
        pytest.fail("no clean 2-character window in any output")
    stop = full[windows[0] : windows[0] + 2]
    cut = complete(url, prompt=prompt, max_tokens=32, stop=["never-seen", stop])
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


# Sessions ----------------------------------------------------------------------------
def test_session_continuation_equals_one_shot(url):
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    first = complete(url, **ids_request("The first part", 7, session_id=sid))
    second = complete(url, **ids_request(" and then", 9, session_id=sid))
    assert second["session_id"] == sid
    history = list(b"The first part") + token_ids(first) + list(b" and then")
    one_shot = complete(url, **ids_request(history, 9))
    assert token_ids(second) == token_ids(one_shot)
    usage = second["usage"]
    assert usage["prompt_tokens"] == len(history) and usage["prompt_tokens_details"]["cached_tokens"] == len(history) - 9 - 1
    info = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert info["tokens"] == len(history) + 9 and info["state_bytes"] > 0


def test_fork_is_independent(url):
    sid = httpx.post(url + "/v1/sessions", json={"metadata": {"who": "test"}}).json()["id"]
    complete(url, **ids_request("root text", 4, session_id=sid))
    fork = httpx.post(f"{url}/v1/sessions/{sid}/fork").json()
    assert fork["id"] != sid and fork["metadata"]["forked_from"] == sid
    a = complete(url, **ids_request(" same", 6, session_id=sid))
    b = complete(url, **ids_request(" same", 6, session_id=fork["id"]))
    assert token_ids(a) == token_ids(b)
    assert httpx.delete(f"{url}/v1/sessions/{fork['id']}").json()["deleted"] is True
    assert httpx.get(f"{url}/v1/sessions/{fork['id']}").status_code == 404
    assert httpx.get(f"{url}/v1/sessions/{sid}").status_code == 200


def test_busy_session_gets_409_and_state_survives(url):
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"model": "tiny", "prompt": "long", "max_tokens": 3000, "stream": True, "ignore_eos": True,
                    "session_id": sid}
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                await lines.__anext__()  # generating now
                busy = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "session_id": sid})
                return busy

    busy = asyncio.run(scenario())
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
    deadline = time.monotonic() + 30  # ends on the event; generous for a busy co-tenant
    while httpx.get(f"{url}/v1/sessions/{sid}").json()["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    info = httpx.get(f"{url}/v1/sessions/{sid}").json()
    assert not info["busy"] and 4 <= info["tokens"] < 4 + 3000  # kept what was produced before the disconnect


# Batching ----------------------------------------------------------------------------
def test_concurrent_streams_complete_correctly_and_batch(url):
    prompts = [f"stream {i}: " + "x" * (i % 5) for i in range(20)]
    alone = [token_ids(complete(url, **ids_request(p, 16))) for p in prompts[:4]]
    before = httpx.get(url + "/metrics").text

    async def one(client, prompt):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
                "stream": True, "logprobs": 0, "return_tokens_as_token_ids": True}
        ids = []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["logprobs"]:
                        ids += [int(t.split(":")[1]) for t in chunk["choices"][0]["logprobs"]["tokens"]]
        return ids

    async def all_streams():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])

    results = asyncio.run(all_streams())
    assert all(len(r) == 16 for r in results)
    assert results[:4] == alone
    after = httpx.get(url + "/metrics").text
    singles = metric_value(after, "crsm_batch_size_bucket", le="1.0") - metric_value(before, "crsm_batch_size_bucket", le="1.0")
    steps = metric_value(after, "crsm_batch_size_count") - metric_value(before, "crsm_batch_size_count")
    assert steps > singles  # some steps decoded more than one sequence
    assert metric_value(after, "crsm_batch_size_sum") - metric_value(before, "crsm_batch_size_sum") >= 20 * 15


def test_disconnect_frees_the_slot(url):
    before = metric_value(httpx.get(url + "/metrics").text, "crsm_requests_finished_total", reason="cancelled") \
        if "reason=\"cancelled\"" in httpx.get(url + "/metrics").text else 0.0
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "go", "max_tokens": 5000,
                                                            "stream": True, "ignore_eos": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    # The engine counts the cancellation when it retires the request and sets the running gauge at the end of
    # that step: wait for both (a scrape in between saw the one without the other under a busy co-tenant).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        if 'reason="cancelled"' in text and metric_value(text, "crsm_requests_finished_total", reason="cancelled") > before \
                and metric_value(text, "crsm_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric_value(text, "crsm_requests_finished_total", reason="cancelled") == before + 1
    assert metric_value(text, "crsm_requests_running") == 0


# Errors -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,payload,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": [999999]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
        ("/v1/completions", {"prompt": "x", "session_id": "sess-missing"}, 404, "session_id"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ("/v1/nothing-here", {}, 404, None),
    ],
)
def test_error_bodies(url, path, payload, status, param):
    kwargs = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, bytes) \
        else {"json": payload}
    r = httpx.post(url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)


def test_context_limit_and_overload(checkpoint):
    with running_server(checkpoint, "--max-context", "64", "--max-running", "1", "--max-waiting", "1",
                        "--max-body-bytes", "2000") as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "y" * 3000})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body over 2000 bytes")
        r = httpx.post(base + "/v1/completions", json={"prompt": "y" * 80})
        assert r.status_code == 400 and "64" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        r = httpx.post(base + "/v1/completions", json={"prompt": "y", "max_tokens": 200})  # beyond the context limit
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "64" in r.text
        ok = complete(base, prompt="y" * 20, max_tokens=60)  # within it, but the context ends first
        assert ok["choices"][0]["finish_reason"] == "length" and ok["usage"]["total_tokens"] <= 64

    with running_server(checkpoint, "--max-running", "1", "--max-waiting", "1") as base:
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                body = {"prompt": "z", "max_tokens": 30000, "stream": True, "ignore_eos": True}
                async with client.stream("POST", "/v1/completions", json=body) as a, \
                        client.stream("POST", "/v1/completions", json=body) as b:
                    assert a.status_code == 200 and b.status_code == 200
                    return await client.post("/v1/completions", json={"prompt": "z", "max_tokens": 2})

        full = asyncio.run(scenario())
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        assert full.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 30  # ends on the event; generous for a busy co-tenant
        while time.monotonic() < deadline:  # once the two streams are gone, the server takes work again
            r = httpx.post(base + "/v1/completions", json={"prompt": "z", "max_tokens": 2})
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_api_keys_isolate_sessions(checkpoint, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-b\n")
    with running_server(checkpoint, "--api-key", "key-a", "--api-keys-file", str(keys)) as base:
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        assert httpx.post(base + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.post(base + "/v1/completions", json={"prompt": "x"},
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        sid = httpx.post(base + "/v1/sessions", json={}, headers=a).json()["id"]
        assert httpx.get(f"{base}/v1/sessions/{sid}", headers=a).status_code == 200
        assert httpx.get(f"{base}/v1/sessions/{sid}", headers=b).status_code == 404
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "session_id": sid, "max_tokens": 2}, headers=b)
        assert r.status_code == 404
        assert httpx.delete(f"{base}/v1/sessions/{sid}", headers=b).status_code == 404
        assert httpx.post(base + "/v1/completions", json={"prompt": "x", "session_id": sid, "max_tokens": 2},
                          headers=a).status_code == 200
        assert httpx.get(base + "/health").status_code == 200  # probes need no key
