"""Replica and drain figures (issue 14): what SIGTERM does to 8 streams, and what a second replica behind nginx buys.

1. Drain: a server with 8 streams (and one non-streamed request) in flight gets SIGTERM. Measured: how each
   stream ended (final event, ``[DONE]``, finish_reason), when (after the signal), what a request arriving
   meanwhile got, and the exit status and time. Two cases: streams that cannot finish (cut at the drain timeout)
   and streams that can. Against a baseline tree (``--baseline-root``, the main checkout before this work: a
   fixed 3 s drain inside uvicorn's shutdown), interleaved round by round.
2. Throughput: aggregate output tokens/s of closed-loop streaming clients against one replica directly, one
   replica behind nginx (deploy/nginx/nginx.conf with both upstreams pointing at it), two replicas behind nginx,
   and one replica given both cores (``--threads 2``). All replicas run at once on one redis-server session store
   (idle ones cost nothing); configurations alternate within each round.

    python -m loadtest.bench_replicas --out loadtest/results/bench_replicas.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from loadtest.bench_serving import bench_checkpoint
from loadtest.nginx import running_nginx
from loadtest.process import free_port, supervised
from loadtest.redis_server import running_redis
from loadtest.run import run_load

ROOT = Path(__file__).resolve().parents[1]
STREAMS = 8


@contextmanager
def server(root: Path, checkpoint: Path, *extra: str):
    """``python -m server`` from the tree at ``root`` (its own code: the editable install resolves from the
    working directory); yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port), "--host",
           "127.0.0.1", "--log-level", "warning", "--model-name", "bench", "--planner-workers", "0", *extra]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with supervised(proc, url + "/ready", 180, f"server ({root})"):
        yield url, proc


# 1. Drain ---------------------------------------------------------------------------------------------------------
async def _stream(client: httpx.AsyncClient, body: dict, first: asyncio.Queue, signalled: list[float]) -> dict:
    """One stream read to its end: how it ended, and when (seconds after the signal)."""
    out = {"done": False, "finish_reason": None, "error_event": False, "cut": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first is not None:
                    first.put_nowait(True)
                    first = None
                if line == "data: [DONE]":
                    out["done"] = True
                    continue
                chunk = json.loads(line[6:])
                out["error_event"] |= "error" in chunk
                for choice in chunk.get("choices", []):
                    out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    except httpx.HTTPError as exc:
        out["cut"] = type(exc).__name__
    out["ended_after_s"] = round(time.monotonic() - signalled[0], 3) if signalled else None
    return out


async def _unstreamed(client: httpx.AsyncClient, body: dict) -> dict:
    try:
        r = await client.post("/v1/completions", json=body)
        reason = r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else None
        return {"status": r.status_code, "finish_reason": reason}
    except (httpx.HTTPError, ValueError) as exc:
        return {"status": None, "error": type(exc).__name__}


async def _late(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        out = {}
        for name, call in (("completion", lambda: client.post("/v1/completions", json={"prompt": "late"})),
                           ("ready", lambda: client.get("/ready"))):
            try:
                r = await call()
                out[name] = {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
            except httpx.HTTPError as exc:
                out[name] = {"status": None, "error": type(exc).__name__}
        return out


async def _drain_round(url: str, proc: subprocess.Popen, max_tokens: int) -> dict:
    body = {"max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    first: asyncio.Queue = asyncio.Queue()
    signalled: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=16)) as client:
        streams = [asyncio.create_task(_stream(client, {**body, "prompt": f"stream {i}"}, first, signalled))
                   for i in range(STREAMS)]
        unstreamed = asyncio.create_task(_unstreamed(client, {"prompt": "whole", "max_tokens": max_tokens,
                                                              "ignore_eos": True}))
        for _ in range(STREAMS):  # every stream has its first chunk: all in flight
            await asyncio.wait_for(first.get(), 120)
        signalled.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the signal is handled at uvicorn's next tick (0.1 s)
        late = await _late(url)
        ended = await asyncio.gather(*streams)
        whole = await unstreamed
    status = await asyncio.to_thread(proc.wait, 120)
    exit_after = time.monotonic() - signalled[0]
    return {"streams": ended, "unstreamed": whole, "late": late, "exit_status": status,
            "exit_after_s": round(exit_after, 3),
            "final_event_and_done": sum(s["done"] and s["finish_reason"] is not None and not s["cut"] for s in ended),
            "last_stream_end_after_s": max(s["ended_after_s"] for s in ended)}


def measure_drain(trees: dict[str, tuple[Path, list[str]]], checkpoint: Path, rounds: int) -> dict:
    cases = {"cut": 30000, "finish": 400}  # endless streams; streams that can finish within a 15 s drain
    results: dict = {case: {name: [] for name in trees} for case in cases}
    for r in range(rounds):
        for case, max_tokens in cases.items():
            for name, (root, extra) in trees.items():
                args = extra if case == "finish" or name == "baseline" else [*extra, "--drain-timeout", "3"]
                with server(root, checkpoint, *args) as (url, proc):
                    one = asyncio.run(_drain_round(url, proc, max_tokens))
                one["server_args"] = args
                results[case][name].append(one)
                print(f"drain round {r} {case} {name}: exit {one['exit_status']} after {one['exit_after_s']} s, "
                      f"{one['final_event_and_done']}/{STREAMS} final events, late {one['late']}", flush=True)
    return results


# 2. Throughput ----------------------------------------------------------------------------------------------------
def measure_throughput(checkpoint: Path, args: argparse.Namespace) -> dict:
    with ExitStack() as stack:
        redis_url = stack.enter_context(running_redis())
        store = ["--session-store", redis_url]
        (url_a, _), (url_b, _) = [stack.enter_context(server(ROOT, checkpoint, *store, "--threads", "1"))
                                  for _ in range(2)]
        url_2t, _ = stack.enter_context(server(ROOT, checkpoint, *store, "--threads", "2"))
        a, b = url_a.removeprefix("http://"), url_b.removeprefix("http://")
        one_nginx = stack.enter_context(running_nginx([a, a], Path(tempfile.mkdtemp(prefix="crsm-nginx-"))))
        two_nginx = stack.enter_context(running_nginx([a, b], Path(tempfile.mkdtemp(prefix="crsm-nginx-"))))
        configs = {"one_replica_direct": url_a, "one_replica_nginx": one_nginx, "two_replicas_nginx": two_nginx,
                   "one_replica_2_threads_direct": url_2t}
        rounds: dict[str, list[dict]] = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, url in configs.items():
                report, _ = asyncio.run(run_load(url, model="bench", concurrency=args.concurrency, rate=None,
                                                 duration=args.seconds, max_requests=None, prompt_chars=64,
                                                 max_tokens=args.max_tokens, api_key=None, seed=r))
                rounds[name].append({"tokens_per_s": report["output_token_throughput"],
                                     "requests": report["requests"], "errors": report["errors"],
                                     "ttft_p50_s": report["ttft_seconds"]["p50"],
                                     "itl_p50_s": report["itl_seconds"]["p50"], "load": os.getloadavg()})
                print(f"throughput round {r} {name}: {report['output_token_throughput']:.0f} tok/s "
                      f"errors {report['errors']}", flush=True)
    summary = {}
    for name, runs in rounds.items():
        rates = [x["tokens_per_s"] for x in runs]
        summary[name] = {"median_tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}
    base = summary["one_replica_direct"]["median_tokens_per_s"]
    for figures in summary.values():
        figures["vs_one_replica_direct"] = figures["median_tokens_per_s"] / base if base else None
    return {"config": {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "seconds": args.seconds,
                       "rounds": args.rounds, "replica_args": "--threads 1 (2_threads: --threads 2), "
                       "--planner-workers 0, --session-store redis://"}, "summary": summary, "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random d_model 256, 4-layer model")
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help="a checkout of the tree before this work, run side by side (e.g. /work/main)")
    parser.add_argument("--drain-rounds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip", choices=["drain", "throughput"], default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "bench_replicas.json")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint or bench_checkpoint(Path(tempfile.mkdtemp(prefix="crsm-bench-")) / "bench")
    report: dict = {"benchmark": "bench_replicas", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "load_before": os.getloadavg()},
                    "commit": _commit(ROOT)}
    if args.skip != "drain":
        trees = {"drain": (ROOT, ["--threads", "1"])}
        if args.baseline_root is not None:
            trees["baseline"] = (args.baseline_root, ["--threads", "1"])
            report["baseline_commit"] = _commit(args.baseline_root)
        report["drain"] = measure_drain(trees, checkpoint, args.drain_rounds)
    if args.skip != "throughput":
        report["throughput"] = measure_throughput(checkpoint, args)
    report["machine"]["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _commit(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
