"""Contention benchmark: the engine's decode tok/s quiet against beside a busy co-tenant, per thread policy.

Each thread policy runs in its own engine process (OpenMP reads its settings
when torch loads, so a policy is a process): ``old`` is torch's default
(one intra-op thread per core, OpenMP's default spinning wait), ``new`` is
what ``python -m server`` now chooses (``server.cli.configure_openmp``: OpenMP's
threads sleep while they wait; :func:`engine.runtime.engine_threads` threads,
as with ``--planner-workers 0``: one on 2 cores); ``passive2`` is two threads
that sleep while they wait.
Each engine process keeps its model loaded and, on request, runs N streams
(closed loop, long requests, temperature 1) for a few seconds and reports
decoded tokens per second. Co-tenants, started and stopped around each
round's measurements:

- ``quiet``: nothing added (the machine's own load is reported beside);
- ``busy``: one process spinning a pure Python loop (one core taken), at the
  engines' niceness;
- ``planner``: a real planner worker (``planner.worker``'s set-up: its
  niceness and threads) searching plan jobs back to back.

Rounds interleave every co-tenant, policy and stream count, so a drift of a
shared machine hits all of them; the JSON holds every round and the ratios
(tok/s beside a co-tenant over tok/s quiet, same policy, same round).

    python -m loadtest.bench_contention [--checkpoint DIR] --out loadtest/results/bench_contention.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "default"


# The engine process -------------------------------------------------------------------------
async def _decode_for(engine, tokenizer, streams: int, seconds: float) -> dict:
    """``streams`` long requests at once for ``seconds``: tokens decoded per second in that window."""
    from engine.requests import GenerationRequest, TokenEvent
    from engine.sampling import SamplingParams

    handles = [engine.submit(GenerationRequest(tokenizer.encode(f"stream {i}: "), SamplingParams(temperature=1.0,
                                                                                                   seed=i),
                                               max_tokens=engine.max_context - 64, ignore_eos=True))
               for i in range(streams)]
    counts = [0] * streams
    window: list[float] = []

    async def read(i: int) -> None:
        async for event in handles[i].events():
            if isinstance(event, TokenEvent) and window and window[0] <= event.time:
                counts[i] += 1

    readers = [asyncio.create_task(read(i)) for i in range(streams)]
    await asyncio.sleep(0.2)  # every stream past its prefill
    window.append(time.monotonic())
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - window[0]
    window[0] = float("inf")  # tokens after the window are not counted
    for handle in handles:
        handle.cancel()
    await asyncio.gather(*readers)
    return {"tokens": sum(counts), "seconds": elapsed, "tok_s": sum(counts) / elapsed}


# Thread policies measured: environment set before torch loads, and the engine's intra-op threads (0: torch's).
POLICIES = {
    "old": ({}, 0),  # torch's default: a thread per core, OpenMP spinning while it waits
    "passive2": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "one": ({}, 1),
    "new": (None, None),  # what the server chooses (server.cli.configure_openmp, engine.runtime.engine_threads)
}


def engine_process(checkpoint: str, policy: str) -> None:
    """Serve measurement requests (one JSON line each on stdin) with the thread policy ``policy``."""
    env, threads = POLICIES[policy]
    if env is None:
        from server.cli import configure_openmp

        configure_openmp(os.environ)
    else:
        os.environ.update(env)
    from engine.checkpoint import load_model
    from engine.loop.scheduler import Engine
    from engine.runtime import engine_threads, set_threads

    set_threads(engine_threads(planner_threads=0) if threads is None else threads)
    import torch

    loaded = load_model(checkpoint)

    async def main() -> None:
        engine = Engine(loaded.model, loaded.tokenizer, max_running=64)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 120)
        print(json.dumps({"ready": True, "threads": torch.get_num_threads(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            ask = json.loads(line)
            print(json.dumps(await _decode_for(engine, loaded.tokenizer, ask["streams"], ask["seconds"])), flush=True)
        engine.shutdown()

    asyncio.run(main())


# Co-tenants ------------------------------------------------------------------------------------
BUSY_LOOP = "while True:\n    pass\n"


def planner_process(checkpoint: str) -> None:
    """A planner worker's set-up and search, back to back, on one job (until killed)."""
    from planner.worker import WorkerSpec, load_planner_for, set_up_worker

    spec = WorkerSpec(checkpoint=checkpoint)
    set_up_worker(spec)
    import torch

    from engine.checkpoint import load_model
    from engine.thinking import PlanJob, ThinkParams

    planner, _, _ = load_planner_for(spec)
    model = load_model(checkpoint).model
    with torch.inference_mode():
        logits, state = model.prefill(torch.tensor([list(b"def generator(): return")]))
        n = 0
        while True:
            tokens = [int(logits[0].argmax())]
            planner.run([PlanJob(n, 0, state.clone(), logits[0], tokens,
                                 ThinkParams())])
            planner.forget(n)
            if n == 0:
                print("searching", flush=True)
            n += 1


def start_cotenant(kind: str, checkpoint: str) -> subprocess.Popen | None:
    if kind == "quiet":
        return None
    code = BUSY_LOOP if kind == "busy" else \
        f"from loadtest.bench_contention import planner_process; planner_process({checkpoint!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    time.sleep(1.0 if kind == "busy" else 0.0)
    return proc


def wait_planner_busy(proc: subprocess.Popen) -> None:
    """Until the planner process has loaded and finished its first search (it says so on stdout)."""
    if proc.stdout.readline().strip() != "searching":
        raise RuntimeError("the planner co-tenant did not start searching")


# The parent -------------------------------------------------------------------------------------
class EngineChild:
    def __init__(self, policy: str, checkpoint: str):
        code = f"from loadtest.bench_contention import engine_process; engine_process({checkpoint!r}, {policy!r})"
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info: dict = {}

    def wait_ready(self) -> dict:
        self.info = json.loads(self.proc.stdout.readline())
        return self.info

    def measure(self, streams: int, seconds: float) -> dict:
        self.proc.stdin.write(json.dumps({"streams": streams, "seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("engine process exited")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(args: argparse.Namespace) -> dict:
    policies, streams, cotenants = args.policies.split(","), [int(s) for s in args.streams.split(",")], \
        args.cotenants.split(",")
    children = {p: EngineChild(p, str(args.checkpoint)) for p in policies}
    rows: list[dict] = []
    try:
        infos = {p: c.wait_ready() for p, c in children.items()}
        for r in range(args.rounds):
            for kind in cotenants:
                proc = start_cotenant(kind, str(args.checkpoint))
                try:
                    if kind == "planner":
                        wait_planner_busy(proc)
                    order = policies if r % 2 == 0 else policies[::-1]
                    for n in streams:
                        for p in order:
                            m = children[p].measure(n, args.seconds)
                            rows.append({"round": r, "cotenant": kind, "policy": p, "streams": n,
                                         "tok_s": m["tok_s"], "load1": os.getloadavg()[0]})
                            print(f"round {r} {kind:8s} {p:4s} {n:2d} streams: {m['tok_s']:7.1f} tok/s "
                                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
    finally:
        for child in children.values():
            child.close()
    return summarize(rows, infos, args)


def summarize(rows: list[dict], infos: dict, args: argparse.Namespace) -> dict:
    """Per policy, stream count and co-tenant: tok/s over rounds, and its ratio to quiet in the same round."""
    def tok_s(r, kind, p, n):
        return next(x["tok_s"] for x in rows if (x["round"], x["cotenant"], x["policy"], x["streams"]) == (r, kind, p, n))

    out: dict = {}
    for p in infos:
        for n in sorted({x["streams"] for x in rows}):
            for kind in sorted({x["cotenant"] for x in rows}):
                rates = [tok_s(r, kind, p, n) for r in range(args.rounds)]
                ratios = [tok_s(r, kind, p, n) / tok_s(r, "quiet", p, n) for r in range(args.rounds)
                          if tok_s(r, "quiet", p, n) > 0]  # a quiet round that decoded nothing has no ratio
                out[f"{p}/{n}/{kind}"] = {
                    "tok_s_median": statistics.median(rates), "tok_s_range": [min(rates), max(rates)],
                    "vs_quiet_median": statistics.median(ratios) if ratios else None,
                    "vs_quiet_range": [min(ratios), max(ratios)] if ratios else None}
    return {"benchmark": "bench_contention", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "load1_range": [min(x["load1"] for x in rows), max(x["load1"] for x in rows)]},
            "checkpoint": str(args.checkpoint), "seconds_per_measure": args.seconds, "rounds": args.rounds,
            "policies": infos, "target_busy_vs_quiet": 0.4, "summary": out, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_contention.json"))
    parser.add_argument("--policies", default="old,passive2,new")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--cotenants", default="quiet,busy,planner")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring window per figure")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, row in report["summary"].items():
        ratio = "n/a" if row["vs_quiet_median"] is None else \
            f"{row['vs_quiet_median']:.2f} ({row['vs_quiet_range'][0]:.2f}-{row['vs_quiet_range'][1]:.2f})"
        print(f"{key:22s} {row['tok_s_median']:7.1f} tok/s  vs quiet {ratio}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
