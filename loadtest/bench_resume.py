"""Resuming a session from each store, against re-sending the history; restart-to-ready; bytes per state.

One run, one machine, arms interleaved round by round:

- time to first token (client side, streamed) of a session resumed with a
  short new prompt after 0 / 1k / 8k tokens of history, on three servers
  that differ only in ``--session-store`` (memory, a directory, a real
  redis-server on loopback), and of re-sending the whole history to the
  memory server without a session;
- restart-to-ready: a server process from spawn to ``/ready`` on a session
  directory that is empty and one holding N sessions, and the directory
  scan alone, in-process;
- the write-back a request end costs the engine thread (``release`` with a
  state) in each store, for the default model and a mamba-130m-shaped state;
- bytes per state and per stored record, computed from the shapes.

Writes JSON to ``loadtest/results/bench_resume.json`` (median and min-max of
every figure, the machine's load before and after).

    python -m loadtest.bench_resume [--repeats 5] [--resends 3] [--sessions 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.process import free_port, stop
from loadtest.redis_server import running_redis
from loadtest.run import stream_completion

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "default"
SHAPE_130M = dict(d_model=768, n_layer=24, d_state=16, expand=2, d_conv=4)
SHAPE_MAMBA2_130M = dict(layer="Mamba2", d_model=768, n_layer=24, d_state=128, headdim=64, ngroups=1, expand=2,
                         d_conv=4)
NEW_TOKENS = 16


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def start_server(checkpoint: Path, store: str) -> tuple[subprocess.Popen, str, float]:
    """A server on a free port; (process, url, seconds from spawn to /ready)."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port),
                             "--log-level", "warning", "--model-name", "bench", "--planner-workers", "0",
                             "--session-store", store], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = started + 300
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server with --session-store {store} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("server not ready")


# Resume ----------------------------------------------------------------------------------------
async def session_with_history(client: httpx.AsyncClient, url: str, history: list[int]) -> str:
    sid = (await client.post(url + "/v1/sessions", json={})).json()["id"]
    if history:
        r = await client.post(url + "/v1/completions", json={"model": "bench", "prompt": history, "max_tokens": 1,
                                                              "session_id": sid})
        r.raise_for_status()
    return sid


async def ttft(client: httpx.AsyncClient, url: str, body: dict) -> float:
    client.base_url = url
    rec = await stream_completion(client, {"model": "bench", "max_tokens": 1, "ignore_eos": True, **body})
    if rec.error is not None or rec.ttft is None:
        raise RuntimeError(f"{url}: {rec.status} {rec.error}")
    return rec.ttft


async def measure_resume(urls: dict[str, str], histories: list[int], repeats: int, resends: int) -> dict:
    """TTFT per (history, arm): the stores resume a session; ``resend`` sends the history again, no session.

    Each store's session is filled once per history (the history then grows
    by the resumed prompts, ~1-2%); every round resumes each store
    ``repeats`` times and re-sends once (while rounds last), in a shuffled order.
    """
    rng = random.Random(7)
    times: dict[str, dict[str, list[float]]] = {str(h): {arm: [] for arm in [*urls, "resend"]} for h in histories}
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
        for h in histories:
            history = [rng.randrange(256) for _ in range(h)]
            sids = {arm: await session_with_history(client, url, history) for arm, url in urls.items()}
            for round_ in range(max(resends, 1)):
                arms = [arm for arm in urls for _ in range(repeats)] + (["resend"] if round_ < resends else [])
                rng.shuffle(arms)
                for arm in arms:
                    new = [rng.randrange(256) for _ in range(NEW_TOKENS)]
                    if arm == "resend":
                        times[str(h)][arm].append(await ttft(client, urls["memory"], {"prompt": history + new}))
                    else:
                        times[str(h)][arm].append(await ttft(client, urls[arm], {"prompt": new, "session_id": sids[arm]}))
            for arm, url in urls.items():
                await client.delete(f"{url}/v1/sessions/{sids[arm]}")
    out = {h: {arm: spread(v) for arm, v in arms.items()} for h, arms in times.items()}
    for arms in out.values():
        arms["ratios_of_medians"] = {f"{arm}_vs_memory": arms[arm]["median"] / arms["memory"]["median"]
                                     for arm in ("directory", "redis")}
        arms["ratios_of_medians"].update({f"resend_vs_{arm}": arms["resend"]["median"] / arms[arm]["median"]
                                          for arm in ("memory", "directory", "redis")})
        arms["ratios_of_minima"] = {f"{arm}_vs_memory": arms[arm]["min"] / arms["memory"]["min"]
                                    for arm in ("directory", "redis")}
    return out


# Restart, write-back, sizes (in-process) -----------------------------------------------------------
def fill_directory(root: Path, checkpoint: Path, n: int) -> int:
    """``n`` sessions with a state of the checkpoint's shape, written through the store; their bytes on disk."""
    from engine.checkpoint import load_model
    from engine.sessions.directory import DirectorySessionStore
    from engine.sessions.identity import model_identity

    model = load_model(checkpoint).model
    store = DirectorySessionStore(root, shape=model.state_shape(), model_id=model_identity(checkpoint))
    state = model.allocate_state(1)
    for i in range(n):
        s = store.create(None, metadata={"i": i})
        store.release(store.lease(s.id, None), state=state, pending=[1], n_tokens=100)
    size = store.nbytes
    store.close()
    return size


def measure_restart(checkpoint: Path, n: int, repeats: int) -> dict:
    from engine.checkpoint import load_model
    from engine.sessions.directory import DirectorySessionStore
    from engine.sessions.identity import model_identity

    with tempfile.TemporaryDirectory(prefix="crsm-bench-") as tmp:
        full, empty = Path(tmp) / "full", Path(tmp) / "empty"
        on_disk = fill_directory(full, checkpoint, n)
        empty.mkdir()
        ready = {"empty": [], f"{n}_sessions": []}
        for _ in range(repeats):
            for name, folder in (("empty", empty), (f"{n}_sessions", full)):
                proc, _, seconds = start_server(checkpoint, str(folder))
                stop(proc)
                ready[name].append(seconds)
        model = load_model(checkpoint).model
        scans = []
        for _ in range(repeats):
            t = time.perf_counter()
            store = DirectorySessionStore(full, shape=model.state_shape(), model_id=model_identity(checkpoint))
            scans.append(time.perf_counter() - t)
            assert len(store) == n
            store.close()
    return {"sessions": n, "bytes_on_disk": on_disk, "spawn_to_ready_s": {k: spread(v) for k, v in ready.items()},
            "directory_scan_s": spread(scans)}


def measure_write_back(redis_url: str, checkpoint: Path, repeats: int) -> dict:
    """Seconds one ``release`` with a new state takes in each store (what the engine thread pays per request)."""
    from engine.checkpoint import load_model
    from engine.sessions import SessionStore
    from engine.sessions.directory import DirectorySessionStore
    from engine.sessions.redis_store import RedisSessionStore
    from engine.state import StateShape

    shapes = {"default": load_model(checkpoint).model.state_shape(), "mamba130m_shape": shape_130m(),
              "mamba2_130m_shape": shape_130m(SHAPE_MAMBA2_130M)}
    out = {}
    for name, shape in shapes.items():
        state = shape.zeros(1)
        with tempfile.TemporaryDirectory(prefix="crsm-bench-") as tmp:
            stores = {"memory": SessionStore(),
                      "directory": DirectorySessionStore(tmp, shape=shape, model_id="bench"),
                      "redis": RedisSessionStore(redis_url, shape=shape, model_id="bench", prefix="bench:")}
            times: dict[str, list[float]] = {k: [] for k in stores}
            leases: dict[str, list[float]] = {k: [] for k in stores}
            sids = {k: s.create(None).id for k, s in stores.items()}
            for _ in range(repeats):
                for arm, store in stores.items():
                    t = time.perf_counter()
                    session = store.lease(sids[arm], None)
                    leases[arm].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    store.release(session, state=state.clone(), pending=[1], n_tokens=10)
                    times[arm].append(time.perf_counter() - t)
            for store in stores.values():
                store.close()
        out[name] = {"state_bytes": state.nbytes, "lease_s": {k: spread(v) for k, v in leases.items()},
                     "release_with_state_s": {k: spread(v) for k, v in times.items()}}
        assert isinstance(shape, StateShape)
    return out


def shape_130m(fields: dict | None = None):
    from engine.config import MambaConfig
    from engine.state import StateShape

    cfg = MambaConfig(vocab_size=50280, **(fields or SHAPE_130M))
    return StateShape(cfg.n_layer, cfg.d_inner, cfg.d_conv, cfg.d_state, arch=cfg.layer,
                      conv_channels=cfg.conv_channels)


def state_sizes(checkpoint: Path) -> dict:
    """Bytes per state from the shapes (fp32 conv and SSM state), and the stored record's size, for Redis sizing."""
    from engine.checkpoint import load_model
    from engine.sessions import Session
    from engine.sessions.record import encode_session
    from engine.state import STORED_SSM_DTYPES

    out = {}
    shapes = (("checkpoint", load_model(checkpoint).model.state_shape()), ("mamba130m_shape", shape_130m()),
              ("mamba2_130m_shape", shape_130m(SHAPE_MAMBA2_130M)))
    for name, shape in shapes:
        formula = shape.n_layer * (shape.conv_width * shape.d_conv * 4 + shape.d_inner * shape.d_state * 4)
        assert formula == shape.nbytes_per_sequence
        session = Session(id="sess-" + "0" * 24, owner=None, state=shape.zeros(1), pending=[1], n_tokens=8000)
        records = {dtype: len(encode_session(session, "0" * 64, shape, STORED_SSM_DTYPES[dtype]))
                   for dtype in STORED_SSM_DTYPES}
        out[name] = {"arch": shape.arch, "n_layer": shape.n_layer, "d_inner": shape.d_inner,
                     "conv_channels": shape.conv_width, "d_conv": shape.d_conv, "d_state": shape.d_state,
                     "state_bytes": formula, "record_bytes": records["float32"],
                     "record_bytes_by_state_dtype": records,
                     "formula": "n_layer * (conv_channels * d_conv + d_inner * d_state) * 4"}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--histories", default="0,1000,8000")
    parser.add_argument("--repeats", type=int, default=5, help="resumes per store per round")
    parser.add_argument("--resends", type=int, default=3, help="rounds; each re-sends the history once")
    parser.add_argument("--sessions", type=int, default=1000, help="sessions in the directory for restart-to-ready")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "bench_resume.json")
    args = parser.parse_args(argv)
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load()},
              "checkpoint": str(args.checkpoint), "new_tokens": NEW_TOKENS, "state_sizes": state_sizes(args.checkpoint)}
    with running_redis() as redis_url, tempfile.TemporaryDirectory(prefix="crsm-bench-") as tmp:
        servers = {arm: start_server(args.checkpoint, store) for arm, store in
                   (("memory", "memory"), ("directory", str(Path(tmp) / "sessions")), ("redis", redis_url))}
        try:
            urls = {arm: url for arm, (_, url, _) in servers.items()}
            histories = [int(h) for h in args.histories.split(",")]
            report["resume_ttft_s"] = asyncio.run(measure_resume(urls, histories, args.repeats, args.resends))
        finally:
            for proc, _, _ in servers.values():
                stop(proc)
        report["write_back"] = measure_write_back(redis_url, args.checkpoint, 20)
    report["restart"] = measure_restart(args.checkpoint, args.sessions, args.restarts)
    report["machine"]["load_after"] = load()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
