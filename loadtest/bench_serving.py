"""Serving benchmark: the figures of the serving issue, measured side by side in one run.

1. Aggregate output tokens/s at 1, 8 and 32 concurrent streams (closed loop).
2. TTFT of a session resumed after 0, 1k and 8k tokens of history, against
   re-sending that history to a stateless request.
3. Single-stream SSE tokens/s against the in-process engine (same checkpoint,
   same request, no HTTP).

The server runs as a subprocess on loopback (``python -m server``); the
in-process engine runs in this process while the server is idle.

    python -m loadtest.bench_serving [--checkpoint DIR] --out loadtest/results/bench_serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.run import run_load, run_resume

ROOT = Path(__file__).resolve().parents[1]


def bench_checkpoint(folder: Path) -> Path:
    """A random byte-level model of the benchmark size (d_model 256, 4 layers): speed does not depend on weights."""
    import torch

    from engine import MambaConfig, MambaLMHeadModel
    from engine.checkpoint import save_checkpoint
    from engine.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=256, n_layer=4, vocab_size=ByteTokenizer().vocab_size))
    return save_checkpoint(model, folder, producer={"tool": "loadtest.bench_serving", "weights": "random"})


def start_server(checkpoint: Path, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port), "--host",
           "127.0.0.1", "--log-level", "warning", "--model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


async def single_stream_pair(checkpoint: Path, url: str, prompt: str, max_tokens: int, repeats: int) -> tuple[float, float]:
    """Median tokens/s of one stream over SSE and of the same request on an in-process engine.

    The two are measured alternately (the server idles while the in-process
    engine runs and the reverse), so drifts of a shared machine hit both.
    """
    from engine.checkpoint import load_model
    from engine.requests import GenerationRequest
    from engine.sampling import SamplingParams
    from engine.scheduler import Engine

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.start()
    while not engine.ready.is_set():
        await asyncio.sleep(0.01)
    sse_rates, engine_rates = [], []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for i in range(repeats + 1):
                body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                        "stream": True}
                t0 = time.perf_counter()
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                sse = max_tokens / (time.perf_counter() - t0)
                handle = engine.submit(GenerationRequest(prompt_ids=loaded.tokenizer.encode(prompt),
                                                         max_tokens=max_tokens, ignore_eos=True,
                                                         params=SamplingParams(temperature=1.0)))
                t0 = time.perf_counter()
                async for _ in handle.events():
                    pass
                if i:  # the first pair warms both up
                    sse_rates.append(sse)
                    engine_rates.append(max_tokens / (time.perf_counter() - t0))
    finally:
        engine.shutdown()
    return statistics.median(sse_rates), statistics.median(engine_rates)


def measure_load(url: str, args: argparse.Namespace) -> dict[str, dict]:
    """Aggregate throughput at 1, 8 and 32 streams; the median of ``rounds`` turns per level."""
    # Levels take turns (1, 8, 32, 1, 8, 32, ...) so a drift of the shared machine hits all of them.
    rounds: dict[str, list[dict]] = {"1": [], "8": [], "32": []}
    for _ in range(args.rounds):
        for c in rounds:
            report, _ = asyncio.run(run_load(url, model="bench", concurrency=int(c), rate=None,
                                             duration=args.duration / args.rounds, max_requests=None,
                                             prompt_chars=args.prompt_chars, max_tokens=args.max_tokens,
                                             api_key=None))
            rounds[c].append(report)
    load = {}
    for c, reports in rounds.items():
        reports.sort(key=lambda r: r["output_token_throughput"])
        load[c] = reports[len(reports) // 2]  # the median round
        load[c]["rounds_output_token_throughput"] = [r["output_token_throughput"] for r in reports]
        report = load[c]
        print(f"concurrency {c}: {report['output_token_throughput']:.0f} tok/s out (rounds "
              f"{', '.join(f'{x:.0f}' for x in load[c]['rounds_output_token_throughput'])}), "
              f"TTFT p50 {report['ttft_seconds']['p50'] * 1e3:.1f} ms, ITL p50 "
              f"{report['itl_seconds']['p50'] * 1e3:.2f} ms, errors {report['errors']}", flush=True)
    return load


def measure_resume(url: str, args: argparse.Namespace) -> dict:
    resume = asyncio.run(run_resume(url, model="bench", histories=[int(h) for h in args.history.split(",")],
                                    new_chars=32, repeats=args.repeats, api_key=None))
    for row in resume["rows"]:
        print(f"history {row['history_chars']}: resumed TTFT {row['resumed_ttft_s'] * 1e3:.1f} ms "
              f"({row['resumed_vs_no_history']:.2f}x of no history), re-sent {row['resent_ttft_s'] * 1e3:.1f} ms",
              flush=True)
    return resume


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random d_model=256, 4-layer model")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_serving.json"))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level, all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="turns taken by the concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, default=128)
    parser.add_argument("--history", default="0,1000,8000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or bench_checkpoint(Path(tmp) / "bench")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        proc = start_server(checkpoint, port, ["--max-running", "32", "--max-waiting", "64"])
        try:
            load = measure_load(url, args)
            resume = measure_resume(url, args)
            sse, engine_rate = asyncio.run(single_stream_pair(checkpoint, url, "x" * args.prompt_chars, 256,
                                                              args.repeats))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"single stream: SSE {sse:.0f} tok/s, in-process engine {engine_rate:.0f} tok/s", flush=True)
    write_report(args, load, resume, sse, engine_rate)


def write_report(args: argparse.Namespace, load: dict, resume: dict, sse: float, engine_rate: float) -> None:
    one = load["1"]["output_token_throughput"]
    report = {
        "benchmark": "bench_serving",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random d_model=256 n_layer=4 byte-level",
        "aggregate_tokens_per_second": {c: r["output_token_throughput"] for c, r in load.items()},
        "aggregate_vs_one_stream": {c: r["output_token_throughput"] / one for c, r in load.items()},
        "target_32_vs_1": 12.0,
        "load": {c: {k: v for k, v in r.items()} for c, r in load.items()},
        "resume": resume,
        "target_resumed_ttft_flat": 1.2,
        "single_stream": {"sse_tok_s": sse, "in_process_tok_s": engine_rate, "ratio": sse / engine_rate,
                          "target_ratio": 0.9},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"aggregate_vs_one_stream": report["aggregate_vs_one_stream"],
                      "resume": [(r["history_chars"], round(r["resumed_vs_no_history"], 2)) for r in resume["rows"]],
                      "sse_vs_engine": round(report["single_stream"]["ratio"], 3)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
