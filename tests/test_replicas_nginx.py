"""Two server replicas on one real redis-server behind a real nginx running deploy/nginx/nginx.conf.

The shipped configuration is used as it is, with only what differs on loopback rewritten
(:func:`loadtest.nginx.loopback_conf`: the replicas' and nginx's addresses, paths under a temporary prefix, one
worker so that round robin strictly alternates). A conversation through nginx, its turns spread over both
replicas, equals the same conversation on one server; streams pass through unbuffered; the optional affinity
header keeps a conversation on one replica; a replica that drains is skipped without the client seeing an error.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from loadtest.nginx import CONF, loopback_conf, nginx_binary, running_nginx
from tests.serving import ROOT, complete, ids_request, metric_value, running_server_process, token_ids

NGINX = nginx_binary()
REDIS = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None or REDIS is None,
                                reason="needs nginx and redis-server (CI installs both in .ci/run)")
REPLICA_ARGS = ("--max-running", "1", "--max-waiting", "8", "--drain-timeout", "60")


@pytest.fixture(scope="module")
def cluster(checkpoint, tmp_path_factory):
    """(nginx URL, [(replica URL, process)] * 2), all on one redis-server."""
    from loadtest.redis_server import running_redis

    with ExitStack() as stack:
        redis_url = stack.enter_context(running_redis())
        replicas = [stack.enter_context(running_server_process(checkpoint, "--session-store", redis_url,
                                                               *REPLICA_ARGS)) for _ in range(2)]
        addresses = [url.removeprefix("http://") for url, _ in replicas]
        nginx = stack.enter_context(running_nginx(addresses, tmp_path_factory.mktemp("nginx")))
        yield nginx, replicas


def finished(url: str) -> float:
    """Requests the replica at ``url`` has finished (every reason)."""
    text = httpx.get(url + "/metrics").text
    return metric_value(text, "crsm_requests_finished_total") if "crsm_requests_finished_total{" in text else 0.0


def streamed_ids(url: str, body: dict) -> tuple[list[int], str]:
    """Token ids and finish_reason of a streamed completion (``logprobs: 0``, ``return_tokens_as_token_ids``)."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    ids = [int(t.split(":")[1]) for c in chunks for ch in c["choices"] for t in (ch["logprobs"] or {}).get("tokens", [])]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(reasons) == 1
    return ids, reasons[0]


TURNS = ["The first part", " and then", " a third", " the end"]


def test_a_conversation_spread_over_both_replicas_equals_one_server(cluster):
    nginx, replicas = cluster
    (url_a, _), (url_b, _) = replicas
    base = httpx.post(url_a + "/v1/sessions", json={}).json()["id"]
    alone = [token_ids(complete(url_a, **ids_request(text, 6, session_id=base))) for text in TURNS]

    before = [finished(url) for url in (url_a, url_b)]
    sid = httpx.post(nginx + "/v1/sessions", json={}).json()["id"]
    through = []
    for i, text in enumerate(TURNS):  # streamed and not, alternately
        body = {"model": "tiny", "temperature": 0, "ignore_eos": True, **ids_request(text, 6, session_id=sid)}
        if i % 2:
            ids, reason = streamed_ids(nginx, body)
        else:
            r = httpx.post(nginx + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            ids, reason = token_ids(r.json()), r.json()["choices"][0]["finish_reason"]
        assert reason == "length"
        through.append(ids)
    served = [finished(url) - b for url, b in zip((url_a, url_b), before)]
    assert through == alone
    assert served[0] >= 1 and served[1] >= 1 and sum(served) == len(TURNS)  # both replicas served turns
    info = httpx.get(f"{nginx}/v1/sessions/{sid}").json()
    assert info["tokens"] == sum(len(t.encode()) for t in TURNS) + 6 * len(TURNS) and not info["busy"]


def test_streams_pass_through_nginx_unbuffered(cluster):
    """With every batch slot taken (--max-running 1 on each replica), a chat stream's first chunk (the role, sent
    before any token) reaches the client through nginx while the request still waits: nginx holds nothing back.
    Hanging up through nginx cancels upstream, which frees the slots, and the waiting stream then ends properly.

    What this checks is the end-to-end behaviour, not the one directive: the server also sends
    ``X-Accel-Buffering: no``, and nginx 1.22 with ``proxy_buffering on`` (that header ignored) was seen to pass
    this chunk on at once too."""
    nginx, replicas = cluster
    forever = {"prompt": "hold the slot", "max_tokens": 30000, "ignore_eos": True, "stream": True}
    readers = []  # kept: a line iterator that is garbage-collected closes its response (httpx)
    with ExitStack() as holders:
        for _ in replicas:  # round robin: one per replica
            r = holders.enter_context(httpx.stream("POST", nginx + "/v1/completions", json=forever, timeout=60))
            readers.append(r.iter_lines())
            assert next(readers[-1]).startswith("data: {")
        # Greedy: sampled at temperature 1, the tiny random model drew the chat template's <|end|> (a stop token
        # that ignore_eos does not cover) within 8 tokens ~3% of the time, and the stream then ended "stop".
        chat = {"messages": [{"role": "user", "content": "wait your turn"}], "max_tokens": 8, "stream": True,
                "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", nginx + "/v1/chat/completions", json=chat, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
            waiting = sum(metric_value(httpx.get(url + "/metrics").text, "crsm_requests_waiting")
                          for url, _ in replicas)
            assert waiting >= 1  # it was queued behind a slot holder when its first chunk arrived
            holders.close()  # hang up the two holders through nginx
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] == "length"


def test_affinity_header_keeps_a_conversation_on_one_replica(cluster):
    nginx, replicas = cluster
    urls = [url for url, _ in replicas]
    for key in ("conversation-1", "conversation-2"):
        before = [finished(url) for url in urls]
        for i in range(4):
            r = httpx.post(nginx + "/v1/completions", headers={"X-Session-Id": key},
                           json={"prompt": f"turn {i}", "max_tokens": 2}, timeout=60)
            assert r.status_code == 200, r.text
        served = sorted(finished(url) - b for url, b in zip(urls, before))
        assert served == [0, 4]


def test_a_draining_replica_is_skipped_without_an_error(cluster):
    """SIGTERM one replica while it holds a stream (so it stays draining): requests through nginx all succeed on
    the other one (nginx passes the 503 on); a second signal ends the held stream with its final event; exit 0.
    Runs last: it stops replica A."""
    nginx, replicas = cluster
    (url_a, proc_a), (url_b, _) = replicas
    sid = httpx.post(url_b + "/v1/sessions", json={}).json()["id"]
    forever = {"prompt": "keep A draining", "max_tokens": 30000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url_a + "/v1/completions", json=forever, timeout=60) as held:
        lines = held.iter_lines()
        assert next(lines).startswith("data: {")
        proc_a.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(url_a + "/ready").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.post(url_a + "/v1/completions", json={"prompt": "x"}).status_code == 503
        answers = [httpx.post(nginx + "/v1/completions", timeout=60,
                              json={"prompt": f"while A drains {i}", "max_tokens": 3, "ignore_eos": True,
                                    **({"session_id": sid} if i % 2 else {})}) for i in range(6)]
        proc_a.send_signal(signal.SIGINT)
        rest = [line for line in lines if line.startswith("data: ")]
    assert [a.status_code for a in answers] == [200] * 6
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert proc_a.wait(timeout=30) == 0
    # the session's three turns, whole (ignore_eos: sampling at temperature 1, the tiny model may draw its EOS early)
    expected = sum(len(f"while A drains {i}".encode()) + 3 for i in (1, 3, 5))
    assert httpx.get(f"{url_b}/v1/sessions/{sid}").json()["tokens"] == expected


def test_loopback_conf_changes_only_addresses_paths_and_workers(tmp_path):
    """The rewrite above keeps every other directive of the shipped file."""
    shipped = CONF.read_text().splitlines()
    rewritten = loopback_conf(["127.0.0.1:1", "127.0.0.1:2"], 3, tmp_path).splitlines()
    kept = [line for line in shipped if not re.search(r"crsm-[ab]:8000|listen 8080|worker_processes|access_log", line)]
    assert all(line in rewritten for line in kept)


def test_compose_file_wires_the_replicas_redis_and_nginx_together():
    """deploy/compose.replicas.yaml (no container engine here: its wiring is checked as data): every replica on the
    shared Redis, each stopped with a grace above its drain timeout, nginx upstreams named after the replica
    services and its published port (loopback only) the one nginx.conf listens on."""
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.replicas.yaml").read_text())
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if s.get("environment", {}).get("CRSM_SESSION_STORE")}
    assert sorted(replicas) == ["crsm-a", "crsm-b"]
    conf = CONF.read_text()
    for name, service in replicas.items():
        env = service["environment"]
        assert env["CRSM_SESSION_STORE"] == "redis://redis:6379/0" and "redis" in service["depends_on"]
        grace = float(service["stop_grace_period"].removesuffix("s"))
        assert grace >= float(env["CRSM_DRAIN_TIMEOUT"]) + 5
        assert "ports" not in service  # reached through nginx only
        assert conf.count(f"server {name}:8000 ") == 2  # in both upstream groups
    assert "redis" in services and "ports" not in services["redis"]
    nginx = services["nginx"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    (published,) = nginx["ports"]
    host, _, rest = published.partition(":")
    assert host == "127.0.0.1" and f"listen {rest.split(':')[1]};" in conf
    assert all(str(p).startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
