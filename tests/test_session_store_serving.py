"""The directory store through real server processes: sessions survive a restart and a ``kill -9``; stored
bytes that are corrupt or another model's are refused over HTTP with a 409 saying why; one server per directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine.checkpoint import load_model
from engine.sessions.identity import model_identity
from engine.sessions.record import decode_session, encode_session
from tests.conftest import reference_greedy
from tests.serving import ROOT, complete, ids_request, running_server_process, token_ids


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint).model


def test_a_session_continues_across_a_restart_and_a_kill_9_as_if_uninterrupted(checkpoint, model, tmp_path):
    store = tmp_path / "sessions"
    with running_server_process(checkpoint, "--session-store", str(store)) as (url, _):
        sid = httpx.post(url + "/v1/sessions", json={"metadata": {"who": "restart"}}).json()["id"]
        first = token_ids(complete(url, **ids_request("The first part", 7, session_id=sid)))
        victims = [httpx.post(url + "/v1/sessions", json={}).json()["id"] for _ in range(2)]
        for victim in victims:
            complete(url, **ids_request("some history", 3, session_id=victim))
    history = list(b"The first part") + first + list(b" and then")
    with running_server_process(checkpoint, "--session-store", str(store)) as (url, proc):  # after a clean stop
        second = token_ids(complete(url, **ids_request(" and then", 9, session_id=sid)))
        refused = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", "1",
                                  "--planner-workers", "0", "--session-store", str(store)], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
        proc.kill()  # kill -9 between requests
        proc.wait()
    assert second == reference_greedy(model, history, 9)
    assert refused.returncode == 2 and "in use by another process" in refused.stderr
    history += second + list(b" at last")
    with running_server_process(checkpoint, "--session-store", str(store)) as (url, _):
        third = token_ids(complete(url, **ids_request(" at last", 5, session_id=sid)))
        info = httpx.get(f"{url}/v1/sessions/{sid}").json()
        assert third == reference_greedy(model, history, 5)
        assert info["tokens"] == len(history) + 5 and info["metadata"] == {"who": "restart"} and not info["busy"]
        fork = httpx.post(f"{url}/v1/sessions/{sid}/fork").json()
        assert (fork["tokens"], fork["metadata"]) == (info["tokens"], {"who": "restart", "forked_from": sid})
        assert httpx.delete(f"{url}/v1/sessions/{fork['id']}").status_code == 200
        assert not (store / f"{fork['id']}.session").exists()
        damage_records(store, victims, model, checkpoint)
        check_refused(url, victims)


def damage_records(store: Path, sids: list[str], model, checkpoint: Path) -> None:
    """The first record gets one bit of its state flipped; the second is rewritten as another model's."""
    corrupt, foreign = (store / f"{sid}.session" for sid in sids)
    damaged = bytearray(corrupt.read_bytes())
    damaged[-7] ^= 0x10
    corrupt.write_bytes(bytes(damaged))
    session = decode_session(foreign.read_bytes(), model.state_shape(), model_identity(checkpoint))
    foreign.write_bytes(encode_session(session, "f" * 64))


def check_refused(url: str, sids: list[str]) -> None:
    """Corrupt, then foreign: every use answers 409 saying why; the session can still be deleted."""
    for sid, why in zip(sids, ("corrupt", "another model")):
        for r in (httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                            "session_id": sid}),
                  httpx.get(f"{url}/v1/sessions/{sid}"), httpx.post(f"{url}/v1/sessions/{sid}/fork")):
            error = r.json()["error"]
            assert r.status_code == 409 and error["code"] == "session_state_invalid" and why in error["message"], r.text
        assert httpx.delete(f"{url}/v1/sessions/{sid}").status_code == 200
        assert httpx.get(f"{url}/v1/sessions/{sid}").status_code == 404
    assert complete(url, prompt="the server is fine", max_tokens=2)["usage"]["completion_tokens"] == 2
