"""Replicas on one Redis, all real processes on loopback: two servers and a redis-server.

A session continues on any replica with the tokens one server would give;
used at once through two replicas it gets exactly one 409; a replica killed
with ``kill -9`` loses nothing that was idle and its unfinished request's
lease expires; a replica whose lease was lost cannot write back; corrupt or
foreign bytes in Redis are refused.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis

from engine.checkpoint import load_model
from engine.sessions.identity import model_identity
from engine.sessions.record import decode_session, encode_session
from loadtest.redis_server import running_redis
from tests.conftest import reference_greedy
from tests.serving import complete, ids_request, metric_value, running_server_process, token_ids
from tests.test_session_store_serving import check_refused

LEASE_SECONDS = "1.0"


@pytest.fixture(scope="module")
def redis_url():
    with running_redis() as url:
        yield url


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint).model


def replica(checkpoint, redis_url):
    return running_server_process(checkpoint, "--session-store", redis_url, "--session-lease-seconds", LEASE_SECONDS)


@pytest.fixture(scope="module")
def replicas(checkpoint, redis_url):
    with replica(checkpoint, redis_url) as (a, _), replica(checkpoint, redis_url) as (b, _):
        yield a, b


def new_session(url: str) -> str:
    return httpx.post(url + "/v1/sessions", json={}).json()["id"]


def test_a_session_made_on_a_continues_on_b_as_on_one_server(replicas, model):
    a, b = replicas
    sid = new_session(a)
    first = token_ids(complete(a, **ids_request("The first part", 7, session_id=sid)))
    second = token_ids(complete(b, **ids_request(" and then", 9, session_id=sid)))
    history = list(b"The first part") + first + list(b" and then")
    assert second == reference_greedy(model, history, 9)
    history += second + list(b"!")
    third = token_ids(complete(a, **ids_request("!", 4, session_id=sid)))
    assert third == reference_greedy(model, history, 4)
    fork = httpx.post(f"{b}/v1/sessions/{sid}/fork").json()["id"]
    assert httpx.get(f"{a}/v1/sessions/{fork}").json()["tokens"] == len(history) + 4
    assert httpx.delete(f"{a}/v1/sessions/{fork}").status_code == 200
    assert httpx.get(f"{b}/v1/sessions/{fork}").status_code == 404


def test_one_session_used_at_once_through_a_and_b_gets_exactly_one_409(replicas):
    a, b = replicas
    sid = new_session(a)

    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "tiny", "prompt": "race", "max_tokens": 400, "ignore_eos": True, "session_id": sid}
            return await asyncio.gather(*(client.post(u + "/v1/completions", json=body) for u in (a, b)))

    answers = asyncio.run(both())
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text[:200] for r in answers]
    busy = next(r for r in answers if r.status_code == 409)
    assert busy.json()["error"]["code"] == "session_busy"
    info = httpx.get(f"{b}/v1/sessions/{sid}").json()
    assert info["tokens"] == 4 + 400 and not info["busy"]


def test_a_replica_that_lost_its_lease_cannot_write_back(replicas, redis_url, model):
    a, b = replicas
    sid = new_session(a)
    first = token_ids(complete(a, **ids_request("fenced", 3, session_id=sid)))

    async def stolen():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "tiny", "prompt": " long", "max_tokens": 30000, "stream": True, "ignore_eos": True,
                    "session_id": sid}
            async with client.stream("POST", a + "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                await lines.__anext__()  # A is generating
                redis.Redis.from_url(redis_url).delete(f"crsm:l:{sid}")  # A's lease is lost
                return await client.post(b + "/v1/completions", json={"model": "tiny", **ids_request(
                    " meanwhile", 5, session_id=sid, ignore_eos=True, temperature=0)})
            # leaving the block hangs up: A cancels and tries to write back its longer state

    on_b = asyncio.run(stolen())
    assert on_b.status_code == 200, on_b.text
    deadline = time.monotonic() + 30
    while metric_value(httpx.get(a + "/metrics").text, "crsm_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    info = httpx.get(f"{b}/v1/sessions/{sid}").json()
    assert info["tokens"] == 6 + 3 + len(b" meanwhile") + 5 and not info["busy"]  # B's write, not A's
    history = list(b"fenced") + first + list(b" meanwhile") + token_ids(on_b.json()) + list(b" end")
    assert token_ids(complete(a, **ids_request(" end", 4, session_id=sid))) == reference_greedy(model, history, 4)


def test_kill_9_loses_nothing_idle_and_an_orphaned_lease_expires(replicas, checkpoint, redis_url, model):
    a, _ = replicas
    with replica(checkpoint, redis_url) as (c, proc):
        idle, running = new_session(c), new_session(c)
        first = token_ids(complete(c, **ids_request("kept", 6, session_id=idle)))
        complete(c, **ids_request("before", 2, session_id=running))

        async def start_and_kill():
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": "tiny", "prompt": " and on", "max_tokens": 30000, "stream": True,
                        "ignore_eos": True, "session_id": running}
                async with client.stream("POST", c + "/v1/completions", json=body) as stream:
                    await stream.aiter_lines().__anext__()
                    proc.kill()  # kill -9 mid-request: the lease stays in Redis, nobody renews it
                    proc.wait()

        asyncio.run(start_and_kill())
        busy = httpx.post(a + "/v1/completions", json={"model": "tiny", "prompt": "x", "session_id": running})
        assert busy.status_code == 409
        deadline = time.monotonic() + 10 * float(LEASE_SECONDS)
        while httpx.get(f"{a}/v1/sessions/{running}").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.1)
        info = httpx.get(f"{a}/v1/sessions/{running}").json()
        assert not info["busy"] and info["tokens"] == 6 + 2  # as before the killed request: it wrote nothing
        second = token_ids(complete(a, **ids_request(" more", 5, session_id=idle)))
        assert second == reference_greedy(model, list(b"kept") + first + list(b" more"), 5)
        complete(a, **ids_request("x", 2, session_id=running))  # usable again


def test_corrupt_or_foreign_bytes_in_redis_are_refused(replicas, redis_url, model, checkpoint):
    a, b = replicas
    sids = [new_session(a) for _ in range(2)]
    for sid in sids:
        complete(a, **ids_request("history", 3, session_id=sid))
    client = redis.Redis.from_url(redis_url)
    damaged = bytearray(client.get(f"crsm:s:{sids[0]}"))
    damaged[-7] ^= 0x10
    client.set(f"crsm:s:{sids[0]}", bytes(damaged))
    session = decode_session(client.get(f"crsm:s:{sids[1]}"), model.state_shape(), model_identity(checkpoint))
    client.set(f"crsm:s:{sids[1]}", encode_session(session, "f" * 64))
    check_refused(b, sids)
