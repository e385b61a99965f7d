"""Serving benchmark: the figures of the serving issue, measured side by side in one run.

1. Aggregate output tokens/s at 1, 8 and 32 concurrent streams (closed loop).
2. TTFT of a session resumed after 0, 1k and 8k tokens of history, against
   re-sending that history to a stateless request.
3. SSE tokens/s against the in-process engine (same checkpoint, same
   requests, no HTTP) at 1 and 32 streams; with ``--baseline-root`` a second
   server from another checkout (e.g. main) takes turns with this one, so the
   ratios before and after a change come from the same minutes.

The servers run as subprocesses on loopback (``python -m server``); the
in-process engine runs in this process while the servers idle. The model is
random (speed does not depend on the weights) of one of three shapes: ``default``
(d_model 256, 4 layers, byte-level), ``130m`` (Mamba-130M's: d_model 768, 24
layers, vocabulary 50280, with a tokenizer.json whose every id decodes to ASCII
text, so each sampled token is one SSE frame) or ``130m-mamba2`` (Mamba2-130M's:
the same width and depth, d_state 128, heads of 64); ``--quantize`` goes to the
server and to the in-process engine alike.

    python -m loadtest.bench_serving [--checkpoint DIR] --out loadtest/results/bench_serving.json
    python -m loadtest.bench_serving --shape 130m --quantize int8 --no-resume --pair-streams 1 \
        --max-tokens 64 --prompt-chars 32 --out loadtest/results/bench_serving_130m_int8.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.run import run_load, run_resume

ROOT = Path(__file__).resolve().parents[1]


# Model shapes (MambaConfig fields); vocab_size None: the byte-level tokenizer's.
SHAPES = {"default": {"d_model": 256, "n_layer": 4, "vocab_size": None},
          "130m": {"d_model": 768, "n_layer": 24, "vocab_size": 50280, "d_state": 16, "expand": 2, "d_conv": 4},
          # state-spaces/mamba2-130m's shape: Mamba-2 heads of 64, one group, d_state 128, vocabulary padded to 16.
          "130m-mamba2": {"d_model": 768, "n_layer": 24, "vocab_size": 50288, "layer": "Mamba2", "d_state": 128,
                          "headdim": 64, "ngroups": 1, "expand": 2, "d_conv": 4}}


def write_tokenizer(path: Path, vocab_size: int) -> Path:
    """bench_engine's merge-free byte-level BPE, its vocabulary filled up to ``vocab_size`` with ASCII tokens.

    Encoding stays one token per byte (no merges reach the added tokens). The fill matters for decoding: the
    server writes no SSE frame for a token whose text is empty, and a random model samples ids past the 256
    byte tokens almost always, so without it a stream would carry a handful of frames instead of one per token.
    """
    from loadtest.bench_engine import write_byte_level_tokenizer

    write_byte_level_tokenizer(path)
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    alphabet = string.ascii_letters + string.digits
    words = ("".join(w) for n in itertools.count(2) for w in itertools.product(alphabet, repeat=n))
    while len(vocab) < vocab_size:
        vocab.setdefault(next(words), len(vocab))
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def bench_checkpoint(folder: Path, shape: str = "default") -> Path:
    """A random model of ``shape`` (see SHAPES) in our format: speed does not depend on weights."""
    import torch

    from engine import MambaConfig, MambaLMHeadModel
    from engine.checkpoint import save_checkpoint
    from engine.text.tokenizer import ByteTokenizer

    fields = dict(SHAPES[shape])
    extra_files = {}
    if fields["vocab_size"] is None:
        fields["vocab_size"] = ByteTokenizer().vocab_size
    else:  # the loader refuses a non-byte-level vocabulary without its tokenizer.json
        folder.parent.mkdir(parents=True, exist_ok=True)
        extra_files["tokenizer.json"] = write_tokenizer(folder.parent / f"{folder.name}.tokenizer.json",
                                                        fields["vocab_size"])
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**fields))
    return save_checkpoint(model, folder, producer={"tool": "loadtest.bench_serving", "weights": "random",
                                                    "shape": shape}, extra_files=extra_files)


def server_args(shape: str, quantize: str, planner_workers: int | None = None) -> list[str]:
    """The options every server of a run gets; ``planner_workers`` None: the server's default, 0 for 130m."""
    if planner_workers is None and shape != "default":
        planner_workers = 0
    args = ["--max-running", "32", "--max-waiting", "64", "--quantize", quantize]
    return args if planner_workers is None else [*args, "--planner-workers", str(planner_workers)]


def start_server(checkpoint: Path, port: int, extra: list[str], root: Path = ROOT) -> subprocess.Popen:
    """``python -m server`` from the checkout ``root`` (the editable install imports from the working directory)."""
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port), "--host",
           "127.0.0.1", "--log-level", "warning", "--model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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


async def _sse_rate(client: httpx.AsyncClient, prompt: str, max_tokens: int, streams: int) -> float:
    """Aggregate tok/s of ``streams`` identical streamed completions at once over SSE."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    async def one() -> None:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(streams)])
    return streams * max_tokens / (time.perf_counter() - t0)


async def _engine_rate(engine, tokenizer, prompt: str, max_tokens: int, streams: int) -> float:
    """The same requests on the in-process engine (no HTTP)."""
    from engine.requests import GenerationRequest
    from engine.sampling import SamplingParams

    async def one() -> None:
        handle = engine.submit(GenerationRequest(prompt_ids=tokenizer.encode(prompt), max_tokens=max_tokens,
                                                 ignore_eos=True, params=SamplingParams(temperature=1.0)))
        async for _ in handle.events():
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(streams)])
    return streams * max_tokens / (time.perf_counter() - t0)


async def sse_vs_engine(checkpoint: Path, urls: dict[str, str], prompt: str, streams: list[int], repeats: int,
                        max_tokens: int, quantize: str = "none") -> dict:
    """Tok/s over SSE of each server in ``urls`` and of the same requests on an in-process engine.

    Measured in turns (each server, then the engine, per repeat and stream count), so drifts of a shared machine
    hit all of them; the in-process engine takes the server's thread policy (``engine_threads`` without a
    planner) and the servers' ``quantize``, and runs while the servers idle. The first turn warms everything up
    and is dropped.
    """
    from engine.checkpoint import load_model
    from engine.loop.scheduler import Engine
    from engine.runtime import engine_threads, set_threads

    set_threads(engine_threads(planner_threads=0))
    loaded = load_model(checkpoint, quantize=quantize)
    engine = Engine(loaded.model, loaded.tokenizer, max_running=max(streams))
    engine.start()
    await asyncio.to_thread(engine.wait_ready, 120)
    rates: dict = {str(n): {name: [] for name in [*urls, "in_process"]} for n in streams}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=max(streams) + 8))
               for name, url in urls.items()}
    try:
        for i in range(repeats + 1):
            for n in streams:
                turn = {name: await _sse_rate(client, prompt, max_tokens, n) for name, client in clients.items()}
                turn["in_process"] = await _engine_rate(engine, loaded.tokenizer, prompt, max_tokens, n)
                if i:
                    for name, rate in turn.items():
                        rates[str(n)][name].append(rate)
                    print(f"{n} streams: " + ", ".join(f"{k} {v:.0f}" for k, v in turn.items()) + " tok/s", flush=True)
    finally:
        for client in clients.values():
            await client.aclose()
        engine.shutdown()
    out = {}
    for n, row in rates.items():
        out[n] = {"tok_s": row, "ratio_to_in_process": {
            name: [a / b for a, b in zip(row[name], row["in_process"])] for name in urls}}
    return out


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
        # In the order run, so round i of each level pairs with round i of the others (ratios per round).
        in_order = {key: [r[key]["p50"] if key != "output_token_throughput" else r[key] for r in reports]
                    for key in ("output_token_throughput", "ttft_seconds", "itl_seconds")}
        reports.sort(key=lambda r: r["output_token_throughput"])
        load[c] = reports[len(reports) // 2]  # the median round
        load[c]["rounds_output_token_throughput"] = [r["output_token_throughput"] for r in reports]
        load[c]["rounds_in_order"] = {"output_token_throughput": in_order["output_token_throughput"],
                                      "ttft_p50_seconds": in_order["ttft_seconds"],
                                      "itl_p50_seconds": in_order["itl_seconds"]}
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
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random model of --shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default",
                        help="random model: default (d_model 256, 4 layers, byte-level) or 130m (d_model 768, "
                             "24 layers, vocabulary 50280)")
    parser.add_argument("--quantize", choices=["none", "bf16", "int8"], default="none",
                        help="the server's --quantize, and the in-process engine's")
    parser.add_argument("--planner-workers", type=int, default=None,
                        help="the server's --planner-workers (default: the server's for --shape default, 0 for "
                             "130m: no second copy of the weights in a worker that nothing here uses)")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_serving.json"))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level, all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="turns taken by the concurrency levels")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-chars", type=int, default=128)
    parser.add_argument("--history", default="0,1000,8000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="skip the resumed-session figures (long histories take minutes on the 130m shape)")
    parser.add_argument("--pair-streams", default="1,32", help="stream counts of the SSE against in-process turns")
    parser.add_argument("--pair-tokens", type=int, default=256, help="tokens per request in those turns")
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help="another checkout (e.g. main) whose server takes turns with this one's (before/after)")
    parser.add_argument("--pairs-only", action="store_true", help="skip the load levels and the resume figures")
    args = parser.parse_args(argv)
    args.server_args = server_args(args.shape, args.quantize, args.planner_workers)
    args.load1_at_start = os.getloadavg()[0]
    from server.cli import configure_openmp

    configure_openmp()  # the in-process engine's OpenMP as the server's: before this process loads torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or bench_checkpoint(Path(tmp) / "bench", args.shape)
        roots = {"this": ROOT, **({"baseline": args.baseline_root.resolve()} if args.baseline_root else {})}
        procs, urls = {}, {}
        try:
            for name, root in roots.items():
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                urls[name] = f"http://127.0.0.1:{port}"
                procs[name] = start_server(checkpoint, port, args.server_args, root)
            load = {} if args.pairs_only else measure_load(urls["this"], args)
            resume = {} if args.pairs_only or not args.resume else measure_resume(urls["this"], args)
            pairs = asyncio.run(sse_vs_engine(checkpoint, urls, "x" * args.prompt_chars,
                                              [int(n) for n in args.pair_streams.split(",")], args.repeats,
                                              args.pair_tokens, args.quantize))
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)
    write_report(args, load, resume, pairs, roots)


def _describe_shape(shape: str) -> str:
    fields = SHAPES[shape]
    if fields["vocab_size"] is None:
        return f"random d_model={fields['d_model']} n_layer={fields['n_layer']} byte-level"
    return "random " + " ".join(f"{k}={v}" for k, v in fields.items())


def _range(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def write_report(args: argparse.Namespace, load: dict, resume: dict, pairs: dict, roots: dict) -> None:
    report = {
        "benchmark": "bench_serving",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load1_at_start": args.load1_at_start,
                    "load1_at_end": os.getloadavg()[0]},
        "checkpoint": str(args.checkpoint) if args.checkpoint else _describe_shape(args.shape),
        "shape": None if args.checkpoint else args.shape, "quantize": args.quantize,
        "servers": {name: str(root) for name, root in roots.items()}, "server_args": args.server_args,
        "max_tokens": args.max_tokens, "prompt_chars": args.prompt_chars, "pair_tokens": args.pair_tokens,
        "duration_per_level": args.duration, "rounds": args.rounds, "repeats": args.repeats,
        "sse_vs_in_process": {n: {"ratio": {name: _range(r) for name, r in row["ratio_to_in_process"].items()},
                                  "tok_s": {name: _range(r) for name, r in row["tok_s"].items()},
                                  "rounds": row} for n, row in pairs.items()},
        "target_sse_vs_in_process_1_stream": 0.9,
    }
    if load:
        one = load["1"]["output_token_throughput"]
        report.update({
            "aggregate_tokens_per_second": {c: r["output_token_throughput"] for c, r in load.items()},
            "aggregate_vs_one_stream": {c: r["output_token_throughput"] / one for c, r in load.items()},
            # Round i of a level over round i of 1 stream (the levels take turns): the spread of the ratio.
            "aggregate_vs_one_stream_rounds": {c: _range([a / b for a, b in zip(
                r["rounds_in_order"]["output_token_throughput"],
                load["1"]["rounds_in_order"]["output_token_throughput"])]) for c, r in load.items()},
            "target_32_vs_1": 12.0, "load": load, "resume": resume, "target_resumed_ttft_flat": 1.2})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({n: v["ratio"] for n, v in report["sse_vs_in_process"].items()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
