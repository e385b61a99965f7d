"""Session store backends, unit by unit: the record format, the directory store and the Redis store (a real
redis-server on loopback). Budget, TTL, leases, fencing, and refusal of corrupt or foreign bytes."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from engine.sessions import (
    Session,
    SessionBusy,
    SessionLeaseLost,
    SessionNotFound,
    SessionStateInvalid,
    SessionStoreUnavailable,
    SessionTooLarge,
    open_session_store,
)
from engine.sessions.directory import DirectorySessionStore, StoreLocked
from engine.sessions.record import MAGIC, decode_session, encode_session
from engine.sessions.redis_store import RedisSessionStore
from engine.state import MambaState, StateError
from loadtest.process import free_port
from loadtest.redis_server import running_redis
from tests.conftest import make_model

MODEL = make_model(d_model=8, n_layer=1)
SHAPE = MODEL.state_shape()
MODEL_ID = "a" * 64


def state(seed: int) -> MambaState:
    s = MODEL.allocate_state(1)
    g = torch.Generator().manual_seed(seed)
    s.conv.copy_(torch.randn(s.conv.shape, generator=g))
    s.ssm.copy_(torch.randn(s.ssm.shape, generator=g))
    return s


def same(a: MambaState, b: MambaState) -> bool:
    return torch.equal(a.conv, b.conv) and torch.equal(a.ssm, b.ssm)


def record_size() -> int:
    return len(encode_session(Session(id="sess-" + "0" * 24, owner="me", state=state(0), pending=[1], n_tokens=2),
                              MODEL_ID))


# The record -------------------------------------------------------------------------------------
def test_a_record_round_trips_and_corrupt_or_foreign_bytes_are_refused_saying_why():
    session = Session(id="sess-" + "1" * 24, owner="me", state=state(1), pending=[7], n_tokens=12,
                      metadata={"k": "v"})
    blob = encode_session(session, MODEL_ID)
    back = decode_session(blob, SHAPE, MODEL_ID)
    assert same(back.state, session.state) and (back.owner, back.pending, back.n_tokens, back.metadata) == (
        "me", [7], 12, {"k": "v"})
    flipped = bytearray(blob)
    flipped[-5] ^= 0x40  # one bit of one float of the state
    for bad, why in ((bytes(flipped), "corrupt"), (blob[:-100], "corrupt"), (b"garbage" * 10, "not a CRSM"),
                     (MAGIC + b"\0" * 40, "corrupt")):
        with pytest.raises(SessionStateInvalid, match=why):
            decode_session(bad, SHAPE, MODEL_ID)
    with pytest.raises(SessionStateInvalid, match="another model"):
        decode_session(blob, SHAPE, "b" * 64)
    other_shape = make_model(d_model=8, n_layer=1, d_state=4)
    foreign = Session(id=session.id, owner="me", state=other_shape.allocate_state(1), n_tokens=1)
    with pytest.raises(SessionStateInvalid, match="shape"):
        decode_session(encode_session(foreign, MODEL_ID), SHAPE, MODEL_ID)
    with pytest.raises(SessionStateInvalid, match="not 'sess-"):
        decode_session(blob, SHAPE, MODEL_ID, expect_id="sess-" + "2" * 24)


def test_state_bytes_name_their_format_and_model():
    data = state(2).to_bytes("m1")
    assert same(MambaState.from_bytes(data, SHAPE, model_id="m1"), state(2))
    assert same(MambaState.from_bytes(data, SHAPE), state(2))  # the planner wire: no model check asked
    with pytest.raises(StateError, match="another model"):
        MambaState.from_bytes(data, SHAPE, model_id="m2")
    with pytest.raises(StateError, match="format"):
        MambaState.from_bytes(data.replace(b"crsm-state/2", b"crsm-state/9"), SHAPE)


# The directory store ----------------------------------------------------------------------------
def directory_store(root, **kw) -> DirectorySessionStore:
    return DirectorySessionStore(root, shape=SHAPE, model_id=MODEL_ID, **kw)


def test_directory_store_survives_a_restart_and_holds_one_process(tmp_path):
    store = directory_store(tmp_path)
    s = store.create("me", metadata={"who": "test"})
    leased = store.lease(s.id, "me")
    with pytest.raises(SessionBusy):
        store.lease(s.id, "me")
    with pytest.raises(SessionNotFound):
        store.lease(s.id, "someone else")
    store.release(leased, state=state(3), pending=[5], n_tokens=9)
    fork = store.fork(s.id, "me")
    with pytest.raises(StoreLocked, match="in use by another process"):
        directory_store(tmp_path)
    (tmp_path / ".tmp-sess-left-by-a-crash").write_bytes(b"half a record")
    store.close()

    again = directory_store(tmp_path)  # a restart: only the listing is read until a session is used
    assert len(again) == 2 and not (tmp_path / ".tmp-sess-left-by-a-crash").exists()
    back = again.get(s.id, "me")
    assert same(back.state, state(3)) and (back.pending, back.n_tokens, back.metadata) == ([5], 9, {"who": "test"})
    assert again.get(fork.id, "me").metadata == {"who": "test", "forked_from": s.id}
    with pytest.raises(SessionNotFound):
        again.get(s.id, "someone else")
    for bad_id in ("../" + s.id, s.id + "/..", "sess-nothere"):
        with pytest.raises(SessionNotFound):
            again.get(bad_id, "me")
    leased = again.lease(s.id, "me")
    again.release(leased)  # a failed request: the session stays as it was
    assert same(again.get(s.id, "me").state, state(3))
    again.delete(fork.id, "me")
    assert len(again) == 1 and not (tmp_path / f"{fork.id}.session").exists()
    again.close()


def test_directory_store_budget_and_ttl_on_disk(tmp_path):
    clock = [1_000_000.0]
    size = record_size()
    store = directory_store(tmp_path, max_bytes=2 * size + 10, ttl_seconds=10, clock=lambda: clock[0])
    ids = []
    for i in range(3):
        s = store.create("me")
        store.release(store.lease(s.id, "me"), state=state(i), pending=[1], n_tokens=2)
        ids.append(s.id)
        clock[0] += 1
    assert len(store) == 2 and store.evictions == 1 and store.nbytes <= 2 * size + 10
    assert sorted(p.name for p in tmp_path.glob("*.session")) == sorted(f"{i}.session" for i in ids[1:])
    with pytest.raises(SessionNotFound):
        store.get(ids[0], "me")
    busy = store.lease(ids[1], "me")
    clock[0] += 11
    assert len(store) == 1  # the idle one expired; the leased one is kept
    store.release(busy)
    store.close()
    clock[0] += 5
    reopened = directory_store(tmp_path, ttl_seconds=10, clock=lambda: clock[0])
    assert len(reopened) == 1  # the TTL runs from the file's mtime, across restarts
    clock[0] += 6
    assert len(reopened) == 0 and not list(tmp_path.glob("*.session"))
    s = reopened.create(None)
    reopened.max_bytes = size // 2
    with pytest.raises(SessionTooLarge):
        reopened.release(reopened.lease(s.id, None), state=state(0), pending=[], n_tokens=1)
    assert len(reopened) == 0 and not reopened._leased  # removed, and the lease is back
    reopened.close()


def test_directory_store_refuses_corrupt_and_foreign_records_and_lets_them_be_deleted(tmp_path):
    store = directory_store(tmp_path)
    a, b = store.create("me"), store.create("me")
    for s in (a, b):
        store.release(store.lease(s.id, "me"), state=state(4), pending=[], n_tokens=3)
    path = tmp_path / f"{a.id}.session"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(SessionStateInvalid, match="corrupt"):
        store.lease(a.id, "me")
    assert not store._leased
    store.delete(a.id, "me")
    store.close()
    foreign = DirectorySessionStore(tmp_path, shape=SHAPE, model_id="c" * 64)  # another model's server
    with pytest.raises(SessionStateInvalid, match="another model"):
        foreign.get(b.id, "me")
    foreign.close()


# The Redis store --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_url():
    with running_redis() as url:
        yield url


@pytest.fixture
def stores(redis_url):
    """Two replicas' stores on one Redis (emptied first)."""
    redis.Redis.from_url(redis_url).flushdb()
    made = []

    def make(**kw) -> RedisSessionStore:
        store = RedisSessionStore(redis_url, shape=SHAPE, model_id=MODEL_ID, **{"lease_seconds": 2.0, **kw})
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_redis_replicas_share_sessions_one_request_at_a_time(stores):
    a, b = stores(), stores()
    s = a.create("me", metadata={"m": 1})
    on_a = a.lease(s.id, "me")
    with pytest.raises(SessionBusy):
        b.lease(s.id, "me")
    with pytest.raises(SessionNotFound):
        b.lease(s.id, "someone else")
    assert b.get(s.id, "me").busy
    with pytest.raises(SessionBusy):
        b.delete(s.id, "me")
    a.release(on_a, state=state(5), pending=[3], n_tokens=8)
    on_b = b.lease(s.id, "me")
    assert same(on_b.state, state(5)) and (on_b.pending, on_b.n_tokens) == ([3], 8)
    b.release(on_b)  # no new state: as it was
    child = b.fork(s.id, "me")
    assert same(a.get(child.id, "me").state, state(5)) and a.get(child.id, "me").metadata["forked_from"] == s.id
    assert len(a) == 2
    a.delete(child.id, "me")
    assert len(b) == 1 and b.nbytes == a.nbytes > 0
    with pytest.raises(SessionNotFound):
        a.get("sess-" + "9" * 24, "me")


def test_redis_fencing_a_replica_that_lost_its_lease_cannot_write_back(stores, redis_url):
    a, b = stores(), stores()
    s = a.create("me")
    stale = a.lease(s.id, "me")
    redis.Redis.from_url(redis_url).delete(f"crsm:l:{s.id}")  # the lease is lost (expired, a partition...)
    on_b = b.lease(s.id, "me")
    stale_token, b_token = stale.lease_token, on_b.lease_token
    assert int(b_token) > int(stale_token)  # fencing tokens only grow
    with pytest.raises(SessionLeaseLost):
        a.release(stale, state=state(6), pending=[], n_tokens=4)  # while B holds it
    b.release(on_b, state=state(7), pending=[1], n_tokens=5)
    on_b.lease_token = b_token
    with pytest.raises(SessionLeaseLost):  # even B's own token, once spent, writes nothing
        b.release(on_b, state=state(6), pending=[], n_tokens=4)
    stale.lease_token = stale_token
    with pytest.raises(SessionLeaseLost):
        a.release(stale, state=state(6), pending=[], n_tokens=4)  # and after B is done
    back = b.get(s.id, "me")
    assert same(back.state, state(7)) and back.n_tokens == 5 and not back.busy


def test_redis_lease_of_a_dead_holder_expires_and_a_live_one_is_renewed(stores):
    a, b = stores(lease_seconds=0.6), stores(lease_seconds=0.6)
    s, t = a.create("me"), a.create("me")
    held = a.lease(s.id, "me")
    dying = b.lease(t.id, "me")
    b.close()  # b "dies" holding t's lease: nothing renews it
    time.sleep(1.5)
    with pytest.raises(SessionBusy):
        a.lease(s.id, "me")  # renewed by a for 2.5 lease times
    again = a.lease(t.id, "me")  # expired: usable again
    a.release(again, state=state(8), pending=[], n_tokens=2)
    a.release(held, state=state(9), pending=[], n_tokens=3)
    assert dying.lease_token is not None and a.get(t.id, "me").n_tokens == 2 and a.get(s.id, "me").n_tokens == 3


def test_redis_budget_ttl_and_refusals(stores, redis_url):
    size = record_size()
    a = stores(max_bytes=2 * size + 10)
    ids = []
    for i in range(3):
        s = a.create("me")
        a.release(a.lease(s.id, "me"), state=state(i), pending=[1], n_tokens=2)
        ids.append(s.id)
        time.sleep(0.01)
    assert len(a) == 2 and a.evictions == 1 and a.nbytes <= 2 * size + 10
    with pytest.raises(SessionNotFound):
        a.get(ids[0], "me")
    tiny = stores(max_bytes=size // 2)
    s = tiny.create(None)
    with pytest.raises(SessionTooLarge):
        tiny.release(tiny.lease(s.id, None), state=state(0), pending=[], n_tokens=1)
    with pytest.raises(SessionNotFound):
        tiny.get(s.id, None)

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    short = stores(ttl_seconds=0.3)
    s = short.create("me")
    assert len(short) == 1
    time.sleep(0.5)
    with pytest.raises(SessionNotFound):
        short.get(s.id, "me")  # Redis expired it
    assert len(short) == 0 and short.evictions == 1 and short.nbytes == 0

    b = stores()
    ok, bad = b.create("me"), b.create("me")
    b.release(b.lease(ok.id, "me"), state=state(1), pending=[], n_tokens=1)
    blob = bytearray(client.get(f"crsm:s:{ok.id}"))
    blob[-2] ^= 8
    client.set(f"crsm:s:{bad.id}", bytes(blob).replace(ok.id.encode(), bad.id.encode()))
    with pytest.raises(SessionStateInvalid, match="corrupt"):
        b.lease(bad.id, "me")
    b.delete(bad.id, "me")  # the refused lease went back; the damaged record can be removed
    foreign = RedisSessionStore(redis_url, shape=SHAPE, model_id="d" * 64)
    try:
        with pytest.raises(SessionStateInvalid, match="another model"):
            foreign.lease(ok.id, "me")
    finally:
        foreign.close()
    assert not b.get(ok.id, "me").busy


def test_an_unreachable_redis_is_reported_and_a_bad_spec_refused():
    with pytest.raises(SessionStoreUnavailable, match="unreachable"):
        open_session_store(f"redis://127.0.0.1:{free_port()}/0", shape=SHAPE, model_id=MODEL_ID)
    with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
        open_session_store("s3://bucket", shape=SHAPE, model_id=MODEL_ID)
    assert type(open_session_store("memory", shape=SHAPE, model_id=MODEL_ID)).__name__ == "SessionStore"


def test_the_cli_refuses_a_bad_store_before_loading_anything(tmp_path, capsys, monkeypatch):
    from server.cli import main, parse_args

    monkeypatch.delenv("CRSM_SESSION_STORE", raising=False)
    assert parse_args([]).session_store == "memory"  # the default stays in-process
    assert main(["--checkpoint", str(tmp_path), "--session-store", "s3://bucket/x"]) == 2
    assert "redis://HOST:PORT/DB" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--session-store", "memory", "--session-lease-seconds", "0"]) == 2
    assert "--session-lease-seconds" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--session-lease-seconds", "inf"), ("--session-lease-seconds", "nan"),
                                        ("--session-ttl", "nan"), ("--session-ttl", "-1"), ("--session-bytes", "0"),
                                        ("--threads", "-1")])
def test_the_cli_refuses_non_finite_or_negative_store_bounds(tmp_path, capsys, flag, value):
    # a NaN TTL expired every session on disk at start-up; an infinite lease made every session request a 500
    from server.cli import main

    assert main(["--checkpoint", str(tmp_path), flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_a_redis_url_with_a_bad_port_is_refused_and_a_bad_env_value_names_its_variable(tmp_path, monkeypatch):
    from server.cli import parse_args

    with pytest.raises(SessionStoreUnavailable, match="not usable"):
        RedisSessionStore("redis://127.0.0.1:99999/0", shape=None, model_id="x")
    monkeypatch.setenv("CRSM_THREADS", "abc")
    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2


def test_a_metrics_scrape_goes_on_while_redis_is_down(tmp_path):
    """/metrics reads the store's figures; with Redis gone they are left out and the rest of the scrape is served."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from engine.sessions import PrefixCache
    from server.metrics import Metrics
    from server.serving import Serving

    metrics = Metrics("m")
    with running_redis() as url:
        store = RedisSessionStore(url, shape=SHAPE, model_id=MODEL_ID)
        serving = SimpleNamespace(engine=SimpleNamespace(sessions=store, prefix_cache=PrefixCache()))
        metrics.bind_store(lambda: Serving._store_figures(serving))
        assert b"crsm_sessions_cached" in generate_latest(metrics.registry)
    text = generate_latest(metrics.registry)  # redis-server has stopped
    assert b"crsm_sessions_cached" not in text and b"crsm_prefix_cache_queries" in text
    store.close()
