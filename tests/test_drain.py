"""Graceful drain on SIGTERM (server/drain.py), against a real server process.

Streams in flight finish or, past ``--drain-timeout``, end with their final event and ``[DONE]``; a request that
arrives meanwhile gets 503 with ``Retry-After``; ``/ready`` says 503, ``/health`` 200; sessions are written back
as far as their requests got (checked by continuing them on a restarted server over the same directory store);
the process exits 0. Upper bounds on time are the drain timeout plus 10 s: loose, not timing tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving import (
    complete,
    ids_request,
    metric_value,
    running_server,
    running_server_process,
    sse_events,
    token_ids,
)

STREAMS = 8


class Streams:
    """``STREAMS`` streamed requests, each read to its end on a thread; :meth:`wait_started` returns once every one
    has sent its first chunk (so each is in flight)."""

    def __init__(self, base: str, bodies: list[tuple[str, dict]]):
        self.lines: list[list[str]] = [[] for _ in bodies]
        self.errors: list[BaseException] = []
        self._started = threading.Barrier(len(bodies) + 1, timeout=60)
        self._threads = [threading.Thread(target=self._read, args=(base + path, body, i), daemon=True)
                         for i, (path, body) in enumerate(bodies)]
        for thread in self._threads:
            thread.start()

    def _read(self, url: str, body: dict, i: int) -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                self.lines[i].append(next(lines))
                self._started.wait()
                self.lines[i].extend(line for line in lines if line.startswith("data: "))
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.errors.append(exc)
            self._started.abort()

    def wait_started(self) -> None:
        self._started.wait()

    def join(self, timeout: float = 120) -> list[list[str]]:
        for thread in self._threads:
            thread.join(timeout)
        assert not self.errors, self.errors
        assert not any(thread.is_alive() for thread in self._threads)
        return self.lines


def final_chunk(lines: list[str]) -> dict:
    """The chunk that carries ``finish_reason`` (the last one with choices), after checking the stream ended with
    exactly one of them and ``[DONE]``."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert not any("error" in c for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1
    return finals[0]


def generated_ids(lines: list[str]) -> list[int]:
    """Token ids of a completion stream asked with ``logprobs: 0, return_tokens_as_token_ids``."""
    out = []
    for line in lines[:-1]:
        chunk = json.loads(line[len("data: "):])
        for choice in chunk["choices"]:
            out += [int(t.split(":")[1]) for t in (choice.get("logprobs") or {}).get("tokens", [])]
    return out


def exited_within(proc: subprocess.Popen, since: float, bound: float) -> float:
    assert proc.wait(timeout=bound + 30) == 0
    elapsed = time.monotonic() - since
    assert elapsed < bound, f"exit took {elapsed:.1f} s, bound {bound} s"
    return elapsed


def test_sigterm_lets_streams_finish_refuses_new_requests_and_exits_0(checkpoint):
    """8 streams in flight finish in full; meanwhile new work gets 503 + Retry-After and /ready 503."""
    drain = 120.0
    n = 3000
    with running_server_process(checkpoint, "--drain-timeout", str(drain)) as (base, proc):
        bodies = [("/v1/completions", {"prompt": f"stream {i}", "max_tokens": n, "ignore_eos": True, "stream": True,
                                       "stream_options": {"include_usage": True}}) for i in range(STREAMS)]
        streams = Streams(base, bodies)
        streams.wait_started()
        assert metric_value(httpx.get(base + "/metrics").text, "crsm_draining") == 0
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)  # the drain starts on uvicorn's next tick (0.1 s)
        late = httpx.post(base + "/v1/completions", json={"prompt": "late", "max_tokens": 4})
        late_chat = httpx.post(base + "/v1/chat/completions",
                               json={"messages": [{"role": "user", "content": "late"}], "stream": True})
        ready, health = httpx.get(base + "/ready"), httpx.get(base + "/health")
        draining = metric_value(httpx.get(base + "/metrics").text, "crsm_draining")
        lines = streams.join()
        elapsed = exited_within(proc, signalled, drain + 10)
    for r in (late, late_chat):
        assert r.status_code == 503 and r.headers["retry-after"] == "5" and r.headers["connection"] == "close"
        assert r.json()["error"]["code"] == "draining"
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    assert health.status_code == 200 and draining == 1
    for stream in lines:
        assert final_chunk(stream)["choices"][0]["finish_reason"] == "length"
        usage = json.loads(stream[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == n
    assert elapsed < drain  # it exited when the streams were done, not at the drain timeout


def test_past_the_drain_timeout_streams_end_with_a_final_event_and_sessions_are_written_back(checkpoint, tmp_path):
    """8 endless streams (4 continuing sessions, 2 chats) and a non-streamed request: after the drain timeout each
    ends with finish_reason "abort" and [DONE]; on a restarted server over the same store each session continues
    exactly from the tokens its stream received (greedy: as the whole history sent at once)."""
    store = str(tmp_path / "sessions")
    drain = 2.0
    with running_server_process(checkpoint, "--session-store", store, "--drain-timeout", str(drain)) as (base, proc):
        sids = [httpx.post(base + "/v1/sessions", json={}).json()["id"] for _ in range(4)]
        firsts = [complete(base, **ids_request(f"turn one {i}", 5, session_id=sid)) for i, sid in enumerate(sids)]
        forever = {"max_tokens": 30000, "ignore_eos": True, "stream": True, "temperature": 0}
        bodies = [("/v1/completions", {**ids_request(f" turn two {i}", 1, session_id=sid), **forever})
                  for i, sid in enumerate(sids)]
        bodies += [("/v1/completions", {"prompt": f"plain {i}", **forever}) for i in range(2)]
        bodies += [("/v1/chat/completions", {"messages": [{"role": "user", "content": f"chat {i}"}], **forever})
                   for i in range(STREAMS - len(bodies))]
        streams = Streams(base, bodies)
        unstreamed: dict = {}
        thread = threading.Thread(target=lambda: unstreamed.update(r=httpx.post(
            base + "/v1/completions", json={"prompt": "whole", "max_tokens": 30000, "ignore_eos": True}, timeout=120)))
        thread.start()
        streams.wait_started()
        time.sleep(0.2)  # the non-streamed one is in flight too
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines = streams.join()
        thread.join(120)
        exited_within(proc, signalled, drain + 10)
    for stream in lines:
        assert final_chunk(stream)["choices"][0]["finish_reason"] == "abort"
    body = unstreamed["r"].json()
    assert unstreamed["r"].status_code == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert body["usage"]["completion_tokens"] > 0
    with running_server(checkpoint, "--session-store", store) as base:
        for i, (sid, first, stream) in enumerate(zip(sids, firsts, lines)):
            second = generated_ids(stream)
            history = list(f"turn one {i}".encode()) + token_ids(first) + list(f" turn two {i}".encode()) + second
            info = httpx.get(f"{base}/v1/sessions/{sid}").json()
            assert info["tokens"] == len(history) and not info["busy"]  # every token it was sent is in the session
            third = complete(base, **ids_request(" turn three", 6, session_id=sid))
            one_shot = complete(base, **ids_request(history + list(b" turn three"), 6))
            assert token_ids(third) == token_ids(one_shot)


def test_a_second_signal_ends_the_streams_at_once_still_with_a_final_event(checkpoint):
    drain = 120.0
    with running_server_process(checkpoint, "--drain-timeout", str(drain)) as (base, proc):
        body = {"prompt": "forever", "max_tokens": 30000, "ignore_eos": True, "stream": True}
        streams = Streams(base, [("/v1/completions", body)] * STREAMS)
        streams.wait_started()
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        lines = streams.join()
        exited_within(proc, signalled, drain / 2)  # far below the drain timeout: the second signal cut it
    for stream in lines:
        assert final_chunk(stream)["choices"][0]["finish_reason"] == "abort"


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_drain_timeout_must_be_a_finite_number_of_seconds(value, checkpoint):
    out = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--drain-timeout", value],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--drain-timeout" in out.stderr


def test_a_think_stream_past_the_drain_timeout_ends_with_its_done_event(checkpoint):
    """/think (a planner worker running): cut by the drain, the stream still ends with one ``done`` event."""
    with running_server_process(checkpoint, "--planner-workers", "1", "--drain-timeout", "1") as (base, proc):
        body = {"prompt": "think on", "max_tokens": 30000, "ignore_eos": True}
        with httpx.stream("POST", base + "/think", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            head = [next(lines) for _ in range(2)]  # the first event: its name and its data
            proc.send_signal(signal.SIGTERM)
            events = sse_events([*head, *lines])
        assert proc.wait(timeout=40) == 0
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "token" and kinds.count("done") == 1 and kinds[-1] == "done" and "error" not in kinds
    assert json.loads(events[-1][1])["finish_reason"] == "abort"
