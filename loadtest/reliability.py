"""The long reliability run (``make reliability``): a report of what a live server did under abuse and load.

    python -m loadtest.reliability --out loadtest/results/reliability.json [--duration 180] [--examples 300]

Two servers on loopback, one after the other, each with the default checkpoint and one planner worker:

1. schemathesis over every operation of ``/openapi.json`` (``loadtest/fuzz.py``), valid and invalid requests from
   a fixed seed, every check, with an API key (so the auth checks run too);
2. ``duration`` seconds of the mixed traffic of ``loadtest/mixed.py`` (completions, chat continued from the
   prefix cache, sessions, thinking, refusals) while a storm of streams is opened and dropped at random points;
   then the server must settle: no request running or waiting, and no session created during the run left busy
   (a request on each one must not get 409).

The report: requests by status, 5xx, lost requests (sent, never answered), leaked leases, timeouts, p50/p99
latency (whole request, from the client), and the fuzzing failures with the request that caused each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from loadtest.fuzz import fuzz
from loadtest.mixed import run_mixed
from loadtest.process import free_port, supervised

ROOT = Path(__file__).resolve().parents[1]
KEY = "reliability"


def start_server(*args: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
           "--planner-workers", "1", *args]
    # Output to DEVNULL: a pipe nobody reads would block the server once its buffer fills.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"http://127.0.0.1:{port}", proc


class Recorder:
    """Every request the clients send: when it was answered (or not), with what status, how long it took."""

    def __init__(self) -> None:
        self.sent = 0
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()  # exceptions by type: lost requests
        self.latencies: list[float] = []
        self.sessions: set[str] = set()
        self.deleted: set[str] = set()

    def client(self, base_url: str, **kw) -> httpx.AsyncClient:
        rec = self

        class Client(httpx.AsyncClient):
            async def send(self, request: httpx.Request, **kwargs):  # type: ignore[override]
                rec.sent += 1
                start = time.perf_counter()
                try:
                    response = await super().send(request, **kwargs)
                except Exception as exc:
                    rec.errors[type(exc).__name__] += 1
                    raise
                rec.statuses[response.status_code] += 1
                path = request.url.path
                if request.method == "DELETE" and response.status_code == 200:
                    rec.deleted.add(path.rsplit("/", 1)[-1])
                if kwargs.get("stream"):
                    close = response.aclose

                    async def aclose() -> None:
                        rec.latencies.append(time.perf_counter() - start)
                        await close()

                    response.aclose = aclose  # type: ignore[method-assign]
                else:
                    rec.latencies.append(time.perf_counter() - start)
                    if path == "/v1/sessions" and response.status_code == 200:
                        rec.sessions.add(response.json()["id"])
                return response

        return Client(base_url=base_url, **kw)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1] if len(values) > 1 else values[0]


async def storm(url: str, rec: Recorder, end: float, seed: int) -> int:
    """Until ``end``: bursts of 10 streams, each dropped after a random number of lines. Streams opened."""
    rng = random.Random(seed)
    opened = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with rec.client(url, timeout=httpx.Timeout(60.0), limits=limits) as client:

        async def one(i: int) -> None:
            chat = i % 3 == 0
            body = {"model": "default", "stream": True, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0}
            if chat:
                body["messages"] = [{"role": "user", "content": f"storm {i}"}]
            else:
                body["prompt"] = f"storm {i}"
            drop = rng.randrange(0, 60)
            try:
                async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions",
                                         json=body) as r:
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if n >= drop:
                            break
            except httpx.HTTPError:
                pass  # counted by the recorder

        while time.monotonic() < end:
            await asyncio.gather(*(one(opened + i) for i in range(10)))
            opened += 10
            await asyncio.sleep(0.5)
    return opened


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def load_phase(url: str, duration: float, concurrency: int, seed: int) -> dict:
    rec, dropped = Recorder(), Recorder()
    end = time.monotonic() + duration
    statuses, opened = await asyncio.gather(
        run_mixed(url, concurrency=concurrency, duration=duration, max_tokens=32, seed=seed, pause=0.05,
                  client_factory=rec.client),
        storm(url, dropped, end, seed))
    # Settle: nothing running or waiting within 60 s of the end.
    settle_end = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while True:
            text = (await client.get("/metrics")).text
            running, waiting = metric(text, "crsm_requests_running"), metric(text, "crsm_requests_waiting")
            if (running, waiting) == (0, 0) or time.monotonic() > settle_end:
                break
            await asyncio.sleep(0.2)
        leaked = []
        for sid in sorted(rec.sessions - rec.deleted):
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "session_id": sid})
            if r.status_code == 409:
                leaked.append(sid)
        healthy = (await client.get("/health")).status_code == 200
    both = rec.statuses + dropped.statuses
    errors = rec.errors + dropped.errors
    return {
        "duration_s": duration, "concurrency": concurrency,
        "requests": rec.sent + dropped.sent, "statuses": {str(k): v for k, v in sorted(both.items())},
        "storm_streams_dropped": opened, "mixed_requests": rec.sent,
        "server_errors_5xx": sum(v for k, v in both.items() if k >= 500),
        "lost_requests": rec.sent + dropped.sent - sum(both.values()), "client_errors": dict(errors),
        "timeouts": sum(v for k, v in errors.items() if "Timeout" in k),
        "leaked_leases": len(leaked), "sessions_checked": len(rec.sessions - rec.deleted),
        "running_after": running, "waiting_after": waiting, "healthy_after": healthy,
        # whole requests of the mixed traffic (the storm's are cut short on purpose)
        "latency_s": {"p50": quantile(rec.latencies, 0.50), "p99": quantile(rec.latencies, 0.99),
                      "n": len(rec.latencies)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="loadtest/results/reliability.json")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of mixed load")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--examples", type=int, default=300, help="schemathesis examples per operation and mode")
    p.add_argument("--seed", type=int, default=20261130)
    a = p.parse_args(argv)
    started = time.time()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}

    url, proc = start_server("--max-context", "64", "--max-running", "4", "--max-waiting", "16",
                             "--api-key", KEY, "--sse-ping-seconds", "1")
    with supervised(proc, url + "/ready", 120, "server"):
        t = time.monotonic()
        fz = fuzz(url, examples=a.examples, seed=a.seed, timeout=30, deadline=1200,
                  headers={"Authorization": f"Bearer {KEY}"})
        report["fuzz"] = {**fz.as_dict(), "seconds": round(time.monotonic() - t, 1),
                          "failures_by_check": dict(Counter(f["check"] for f in fz.failures))}
    print(json.dumps({k: v for k, v in report["fuzz"].items() if k != "failures"}), flush=True)

    url, proc = start_server("--max-context", "512", "--max-running", "8", "--max-waiting", "32",
                             "--model-name", "default")
    with supervised(proc, url + "/ready", 120, "server"):
        report["load"] = asyncio.run(load_phase(url, a.duration, a.concurrency, a.seed))
    print(json.dumps(report["load"]), flush=True)
    report["seconds"] = round(time.time() - started, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    load = report["load"]
    ok = (load["server_errors_5xx"] == 0 and load["lost_requests"] == 0 and load["leaked_leases"] == 0
          and load["timeouts"] == 0 and report["fuzz"]["server_errors"] == 0 and report["fuzz"]["timeouts"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
