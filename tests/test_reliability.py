"""Reliability against a live server: generated requests over the whole document, a disconnect storm, overload,
and a planner worker killed mid-``/think``. Every wait is bounded and ends on an event (a chunk, a status, a
metric), never on a fixed sleep; nothing asserts a timing.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from loadtest.fuzz import fuzz
from tests.serving import metric_value, running_server, running_server_process, sse_events

KEY = "reliability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

def wait_until(predicate, deadline_s: float, what: str, poll_s: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``deadline_s`` passes (fails naming it)."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(poll_s)


def gauges(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return metric_value(text, "crsm_requests_running"), metric_value(text, "crsm_requests_waiting")


def greedy(url: str) -> str:
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60, json={
        "model": "tiny", "prompt": "reliable", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# 1. Schemathesis over every operation ----------------------------------------------------------------------
def test_generated_requests_over_every_operation(checkpoint):
    """>= 1,000 generated requests (valid and invalid) over every documented operation, every check on every
    response; 0 failures, 0 5xx, 0 timeouts. A fixed seed makes the run repeatable."""
    with running_server(checkpoint, "--max-context", "64", "--max-running", "4", "--max-waiting", "16",
                        "--api-key", KEY, "--planner-workers", "1", "--sse-ping-seconds", "1") as url:
        report = fuzz(url, examples=80, seed=20261130, timeout=30, deadline=240, headers=AUTH)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert_sse_events_are_checked(url)
    assert len(report.operations) >= 11, report.operations
    assert report.requests >= 1000, report.as_dict()
    assert report.server_errors == 0 and report.timeouts == 0, report.as_dict()
    # Refused by design although the schema allows them, because no request schema can state the rule:
    # a prompt over --max-context once tokenized (400 context_length_exceeded: a limit in tokens), and an
    # empty prompt without a session to continue (400 "the prompt is empty": valid only with session_id).
    failures = [f for f in report.failures if not (f["check"] == "Schema-valid request rejected" and by_design(f))]
    assert not failures, json.dumps(failures, indent=1)


def by_design(failure: dict) -> bool:
    return bool(failure["param"]) and (failure["param"].endswith("/context_length_exceeded")
                                       or "the prompt is empty" in failure["response"])


def assert_sse_events_are_checked(url: str) -> None:
    """The response-schema check reads each SSE event's JSON against the document: a real stream passes,
    a made-up payload fails (so a clean fuzzing run means the streams conform, not that nothing was read)."""
    import schemathesis
    from schemathesis.core.transport import Response

    op = schemathesis.openapi.from_url(url + "/openapi.json", headers=AUTH)["/v1/chat/completions"]["POST"]
    case = op.Case(body={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3},
                   media_type="application/json")
    real = case.call(base_url=url, headers=AUTH)
    check = [schemathesis.checks.response_schema_conformance]
    case.validate_response(real, checks=check)
    bogus = Response(200, real.headers, b'data: {"bogus": 1}\n\ndata: [DONE]\n\n', real.request, 0.0, True)
    with pytest.raises(BaseException, match="SSE event violates schema"):
        case.validate_response(bogus, checks=check)


# SSE over httpx.AsyncClient ----------------------------------------------------------------------------------
async def read_stream(client: httpx.AsyncClient, path: str, body: dict, drop_after: int | None = None) -> dict:
    """POST a stream; read ``data:`` lines (all, or ``drop_after`` of them, then hang up). What was seen."""
    seen = {"status": None, "data": [], "events": [], "retry_after": None}
    async with client.stream("POST", path, json=body, headers=AUTH) as r:
        seen["status"] = r.status_code
        seen["retry_after"] = r.headers.get("retry-after")
        if r.status_code != 200:
            await r.aread()
            return seen
        if drop_after == 0:
            return seen
        kind = "message"
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen["data"].append(line[6:])
                seen["events"].append(kind)
                kind = "message"
                if drop_after is not None and len(seen["data"]) >= drop_after:
                    return seen  # leaving the block closes the connection mid-stream
    return seen


def completion(prompt: str, max_tokens: int, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
            "ignore_eos": True, **extra}


# 2. Disconnect storm ---------------------------------------------------------------------------------------
def test_disconnect_storm_leaves_nothing_behind(checkpoint):
    """100 streamed completions and 30 long chat streams (some on sessions) dropped at random points: the server
    stays healthy, the running gauge returns to 0, no session stays busy, greedy output is unchanged."""
    with running_server(checkpoint, "--max-context", "1024", "--max-running", "32", "--max-waiting", "256",
                        "--api-key", KEY) as url:
        before = greedy(url)
        sessions = [httpx.post(url + "/v1/sessions", headers=AUTH, json={}, timeout=10).json()["id"]
                    for _ in range(10)]
        rng = random.Random(7)

        async def storm() -> list[dict]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                jobs = []
                for i in range(100):
                    extra = {"session_id": sessions[i % 10]} if i < 10 else {}  # one request per session
                    jobs.append(read_stream(client, "/v1/completions", completion(f"storm {i}", 64, **extra),
                                            drop_after=rng.randrange(0, 40)))
                for i in range(30):
                    body = {"model": "tiny", "messages": [{"role": "user", "content": f"long {i}"}],
                            "max_tokens": 900, "stream": True, "ignore_eos": True}
                    jobs.append(read_stream(client, "/v1/chat/completions", body, drop_after=rng.randrange(1, 300)))
                return await asyncio.gather(*jobs)

        results = asyncio.run(storm())
        assert {r["status"] for r in results} == {200}, [r["status"] for r in results]
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        wait_until(lambda: gauges(url) == (0.0, 0.0), 60, "crsm_requests_running and _waiting back to 0")
        for sid in sessions:  # given back: a request on each one is served, not refused as busy (409)
            r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                           json={"model": "tiny", "prompt": "after", "max_tokens": 2, "session_id": sid})
            assert r.status_code == 200, (sid, r.status_code, r.text)
        assert greedy(url) == before


# 3. Overload -------------------------------------------------------------------------------------------------
def test_overload_answers_429_and_loses_nothing(checkpoint):
    """With every slot and queue place held by open streams, a burst gets 429 + Retry-After; then a second burst
    of many more requests than capacity: each answer is a 200 stream with one final chunk and [DONE], or a 429;
    every request is accounted for."""
    running, waiting = 2, 3
    with running_server(checkpoint, "--max-context", "16384", "--max-running", str(running),
                        "--max-waiting", str(waiting), "--api-key", KEY) as url:

        async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                # Hold capacity: streams long enough that they are still running while the burst arrives.
                held = [asyncio.create_task(read_stream(client, "/v1/completions",
                                                        completion(f"held {i}", 16000, temperature=0)))
                        for i in range(running + waiting)]
                await asyncio.to_thread(wait_until, lambda: gauges(url) == (running, waiting), 60,
                                        "the held streams running and waiting")
                burst = await asyncio.gather(*(read_stream(client, "/v1/completions", completion(f"b {i}", 8))
                                               for i in range(20)))
                for task in held:  # release the capacity by hanging up (the storm test covers what that leaves)
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
                await asyncio.to_thread(wait_until, lambda: gauges(url) == (0.0, 0.0), 60, "capacity freed")
                mixed = await asyncio.gather(*(read_stream(client, "/v1/completions", completion(f"m {i}", 48, stream_options={"include_usage": True}))
                                               for i in range(40)))
                return held, burst, mixed

        _, burst, mixed = asyncio.run(scenario())
        assert all(r["status"] == 429 and r["retry_after"] for r in burst), [(r["status"], r["retry_after"])
                                                                           for r in burst]
        statuses = [r["status"] for r in mixed]
        assert len(mixed) == 40 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 1, statuses
        for r in mixed:
            if r["status"] == 429:
                assert r["retry_after"], r
                continue
            assert r["data"][-1] == "[DONE]" and r["data"].count("[DONE]") == 1, r["data"][-3:]
            chunks = [json.loads(d) for d in r["data"][:-1]]
            finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
            assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length", chunks[-2:]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 48, chunks[-1]
        text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
        assert metric_value(text, "crsm_request_errors_total", status="429") == 20 + statuses.count(429)
        wait_until(lambda: gauges(url) == (0.0, 0.0), 60, "nothing running or waiting")


# 4. Planner worker killed mid-/think -------------------------------------------------------------------------
def planner_workers(server_pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(server_pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


def think_outcomes(url: str, max_tokens: int = 24) -> tuple[list[str], str]:
    """One /think: the outcomes of its thought events and the kind of its last event."""
    with httpx.stream("POST", url + "/think", headers=AUTH, timeout=120,
                      json={"prompt": "plan", "max_tokens": max_tokens, "deliberation_lag": 0, "plan_every": 4,
                            "temperature": 0}) as r:
        assert r.status_code == 200, r.read()
        events = [(kind, json.loads(data)) for kind, data in sse_events(r.iter_lines())]
    return [ev["outcome"] for k, ev in events if k == "thought"], events[-1][0]


def test_planner_worker_killed_mid_think(checkpoint):
    pytest.importorskip("psutil")
    with running_server_process(checkpoint, "--max-context", "2048", "--planner-workers", "1",
                                "--api-key", KEY, timeout=120) as (url, proc):
        wait_until(lambda: "error" not in (o := think_outcomes(url)[0]) and o, 120, "the worker answering plans",
                   poll_s=0.5)
        [worker] = planner_workers(proc.pid)

        async def scenario() -> list[dict]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {"prompt": "think", "max_tokens": 600, "ignore_eos": True, "temperature": 0,
                        "deliberation_lag": 0, "plan_every": 4}
                streams = [asyncio.create_task(read_stream(client, "/think", {**body, "prompt": f"think {i}"}))
                           for i in range(4)]
                # kill once every stream is streaming (its first token counted by the engine)
                await asyncio.to_thread(wait_until, lambda: gauges(url)[0] == 4, 60, "4 /think streams running")
                worker.kill()
                return await asyncio.gather(*streams)

        results = asyncio.run(scenario())
        for r in results:
            assert r["status"] == 200 and r["events"].count("done") == 1 and r["events"][-1] == "done", r["events"][-3:]
            assert json.loads(r["data"][-1])["finish_reason"] == "length"
        # the pool starts a new worker, and plans succeed again
        wait_until(lambda: (o := think_outcomes(url)[0]) and "error" not in o and "timeout" not in o, 120,
                   "plans without error after the restart", poll_s=0.5)
        assert [p.pid for p in planner_workers(proc.pid)] != [worker.pid]
        text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
        assert metric_value(text, "crsm_planner_jobs_total", outcome="error") >= 1  # the kill was noticed
        wait_until(lambda: gauges(url) == (0.0, 0.0), 60, "nothing running or waiting")
