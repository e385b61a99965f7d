"""Load generator for OpenAI-compatible streaming servers (ours, or any other).

    python -m loadtest.run --url http://127.0.0.1:8000 --concurrency 8 --duration 20
    python -m loadtest.run --url ... --rate 4 --duration 30          # Poisson arrivals
    python -m loadtest.run --url ... --scenario resume --history 0,1000,8000

Reports the figures vLLM's and guidellm's benchmarks report, so numbers
compare: TTFT, TPOT = (E2E - TTFT) / (tokens - 1), ITL per chunk, E2E, with
p50/p95/p99, request and token throughput, errors by status; as JSON, and a
PNG when --plot is given. The resume scenario measures the time to first
token of a session continued after H tokens of history, against re-sending
those H tokens to a stateless request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

WORDS = ("state space model token stream session planner latency batch recurrent scan kernel request server "
         "thinking speaking cache prefix decode prefill metric window channel signal").split()


def make_prompt(n_chars: int, rng: random.Random) -> str:
    out: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


@dataclass
class RequestRecord:
    start: float
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    status: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


async def stream_completion(client: httpx.AsyncClient, body: dict) -> RequestRecord:
    """One streamed completion, timed on the client side."""
    rec = RequestRecord(start=time.perf_counter())
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}}) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = (await r.aread()).decode(errors="replace")[:200]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    rec.error = chunk["error"].get("message")
                    continue
                now = time.perf_counter()
                if chunk.get("choices"):
                    if rec.ttft is None:
                        rec.ttft = now - rec.start
                    elif last is not None:
                        rec.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.cached_tokens = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            rec.e2e = time.perf_counter() - rec.start
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p95": qs[94], "p99": qs[98], "mean": statistics.fmean(values)}


def summarize(records: list[RequestRecord], wall: float) -> dict:
    ok = [r for r in records if r.error is None and r.status == 200 and r.e2e is not None]
    errors: dict[str, int] = {}
    for r in records:
        if r not in ok:
            key = str(r.status or "transport")
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(records), "completed": len(ok), "errors": errors, "wall_seconds": wall,
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_token_throughput": out_tokens / wall if wall else 0.0,
        "input_token_throughput": sum(r.prompt_tokens for r in ok) / wall if wall else 0.0,
        "ttft_seconds": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "tpot_seconds": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_seconds": percentiles([x for r in ok for x in r.itl]),
        "e2e_seconds": percentiles([r.e2e for r in ok]),
    }


async def run_load(url: str, *, model: str | None, concurrency: int | None, rate: float | None, duration: float,
                   max_requests: int | None, prompt_chars: int, max_tokens: int, api_key: str | None,
                   seed: int = 0) -> tuple[dict, list[RequestRecord]]:
    """Closed loop (``concurrency`` clients back to back) or open loop (Poisson ``rate`` per second)."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=(concurrency or 256) + 8)
    records: list[RequestRecord] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0), limits=limits) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]

        def body() -> dict:
            return {"model": model, "prompt": make_prompt(prompt_chars, rng), "max_tokens": max_tokens,
                    "ignore_eos": True, "temperature": 1.0}

        start = time.perf_counter()
        deadline = start + duration
        budget = [max_requests if max_requests is not None else 1 << 62]

        def take() -> bool:
            if time.perf_counter() >= deadline or budget[0] <= 0:
                return False
            budget[0] -= 1
            return True

        if concurrency is not None:
            async def worker() -> None:
                while take():
                    records.append(await stream_completion(client, body()))

            await asyncio.gather(*[worker() for _ in range(concurrency)])
        else:
            tasks = []
            while take():
                tasks.append(asyncio.create_task(stream_completion(client, body())))
                await asyncio.sleep(rng.expovariate(rate))
            records.extend(await asyncio.gather(*tasks))
        wall = time.perf_counter() - start
    report = summarize(records, wall)
    report["config"] = {"url": url, "model": model, "concurrency": concurrency, "rate": rate, "duration": duration,
                        "prompt_chars": prompt_chars, "max_tokens": max_tokens}
    return report, records


async def run_resume(url: str, *, model: str | None, histories: list[int], new_chars: int, repeats: int,
                     api_key: str | None) -> dict:
    """TTFT of a continued session vs re-sending the history, for each history size (characters)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(1)
    rows = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0)) as client:
        if model is None:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for h in histories:
            resumed, resent = [], []
            for _ in range(repeats):
                history = make_prompt(h, rng) if h else ""
                new = make_prompt(new_chars, rng)
                sid = (await client.post("/v1/sessions", json={})).json()["id"]
                if history:
                    r = await client.post("/v1/completions", json={"model": model, "prompt": history, "max_tokens": 1,
                                                                    "session_id": sid})
                    r.raise_for_status()
                rec = await stream_completion(client, {"model": model, "prompt": new, "max_tokens": 4,
                                                       "session_id": sid, "ignore_eos": True})
                resumed.append(rec.ttft)
                rec = await stream_completion(client, {"model": model, "prompt": history + new, "max_tokens": 4,
                                                       "ignore_eos": True})
                resent.append(rec.ttft)
                await client.delete(f"/v1/sessions/{sid}")
            rows.append({"history_chars": h, "resumed_ttft_s": statistics.median(resumed),
                         "resent_ttft_s": statistics.median(resent)})
    base = rows[0]["resumed_ttft_s"]
    for row in rows:
        row["resumed_vs_no_history"] = row["resumed_ttft_s"] / base
        row["resent_vs_resumed"] = row["resent_ttft_s"] / row["resumed_ttft_s"]
    return {"scenario": "resume", "model": model, "new_chars": new_chars, "repeats": repeats, "rows": rows}


def plot(report: dict, records: list[RequestRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.error is None and r.e2e is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, values) in zip(axes, (
        ("TTFT (ms)", [r.ttft * 1e3 for r in ok if r.ttft is not None]),
        ("ITL (ms)", [x * 1e3 for r in ok for x in r.itl]),
        ("E2E (s)", [r.e2e for r in ok]),
    )):
        if values:
            ax.hist(values, bins=40)
            for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                qs = percentiles(values)
                ax.axvline(qs[q], color="k", linestyle=style, label=f"{q} {qs[q]:.3g}")
            ax.legend()
        ax.set_title(name)
    cfg = report["config"]
    fig.suptitle(f"{cfg['model']}: concurrency={cfg['concurrency']} rate={cfg['rate']}  "
                 f"{report['output_token_throughput']:.0f} tok/s out, {report['completed']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name (default: the first from /v1/models)")
    parser.add_argument("--scenario", choices=("load", "resume"), default="load")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients back to back")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds to keep sending")
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--prompt-chars", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--history", default="0,1000,8000", help="resume scenario: history sizes in characters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/run.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the latency distributions")
    args = parser.parse_args(argv)
    if args.scenario == "resume":
        report = asyncio.run(run_resume(args.url, model=args.model, histories=[int(h) for h in args.history.split(",")],
                                        new_chars=args.prompt_chars, repeats=args.repeats, api_key=args.api_key))
    else:
        if args.concurrency is None and args.rate is None:
            args.concurrency = 1
        report, records = asyncio.run(run_load(
            args.url, model=args.model, concurrency=args.concurrency, rate=args.rate, duration=args.duration,
            max_requests=args.max_requests, prompt_chars=args.prompt_chars, max_tokens=args.max_tokens,
            api_key=args.api_key))
        if args.plot:
            plot(report, records, args.plot)
        report["records"] = [asdict(r) for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "records"}, indent=2))


if __name__ == "__main__":
    main()
