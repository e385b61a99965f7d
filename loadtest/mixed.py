"""Mixed traffic that moves every panel of the dashboard, for demos and the observability test.

    python -m loadtest.mixed --url http://127.0.0.1:8000 --concurrency 4 --duration 60

Each client repeats one *round*: a streamed completion, a chat conversation
continued once (a prefix-cache hit), a session continued twice, a completion
that thinks (planner jobs, injections, lag), and a few requests the server
must refuse (404, 400), so the error panels have series. Bounded: it stops
after ``duration`` seconds or ``rounds`` rounds per client, whichever first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter

import httpx

from loadtest.run import make_prompt, stream_completion

# Thinking that lands without holding up the first token: with the defaults
# (lag 0, a plan per token) a thinking request waits for a search before
# every token, its first one included, which is the point for short answers
# but would set the mixed load's TTFT by the planner. Lag 1 plans every 8
# tokens and waits one token later (jobs, injections, confidence, a_eff and
# lag have data); min_confidence 0 so that low confidences still land.
THINK = {"min_confidence": 0.0, "deliberation_lag": 1, "plan_every": 8}


async def one_round(client: httpx.AsyncClient, model: str, rng: random.Random, max_tokens: int,
                    think: bool) -> Counter:
    """One pass over every kind of request; returns the HTTP statuses seen."""
    seen: Counter = Counter()
    prompt = make_prompt(64, rng)
    record = await stream_completion(client, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 1.0, "seed": rng.randrange(1 << 30)})
    seen[record.status] += 1

    messages = [{"role": "user", "content": make_prompt(48, rng)}]
    for _ in range(2):  # the second request repeats the conversation: its prefix comes from the cache
        r = await client.post("/v1/chat/completions", json={"model": model, "messages": messages,
                                                            "max_tokens": max_tokens // 2, "temperature": 0})
        seen[r.status_code] += 1
        if r.status_code != 200:
            break
        messages += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": make_prompt(24, rng)}]

    r = await client.post("/v1/sessions", json={})
    seen[r.status_code] += 1
    if r.status_code == 200:
        session = r.json()["id"]
        for _ in range(2):
            r = await client.post("/v1/completions", json={"model": model, "prompt": make_prompt(32, rng),
                                                           "session_id": session, "max_tokens": max_tokens // 2})
            seen[r.status_code] += 1
        if rng.random() < 0.5:  # keep some sessions cached, drop others
            seen[(await client.delete(f"/v1/sessions/{session}")).status_code] += 1

    if think:
        r = await client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                       "max_tokens": max(48, max_tokens), "temperature": 0,
                                                       "think": THINK})
        seen[r.status_code] += 1

    for method, path, body in (("POST", "/v1/completions", {"model": "no-such-model", "prompt": "x"}),
                               ("POST", "/v1/completions", {"model": model, "prompt": "x", "temperature": -1}),
                               ("GET", "/v1/sessions/sess-missing", None)):
        seen[(await client.request(method, path, json=body)).status_code] += 1
    return seen


async def run_mixed(url: str, *, concurrency: int = 4, duration: float = 30.0, rounds: int | None = None,
                    max_tokens: int = 32, think: bool = True, seed: int = 0, pause: float = 0.0,
                    client_factory=httpx.AsyncClient) -> dict[int, int]:
    """Drive ``concurrency`` clients for ``duration`` seconds (or ``rounds`` rounds each); statuses seen.

    ``pause`` seconds between a client's rounds leave CPU to others on a shared machine; ``client_factory``
    makes the client (``loadtest/reliability.py`` passes one that records every request).
    """
    async with client_factory(base_url=url, timeout=httpx.Timeout(120.0)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        end = time.monotonic() + duration
        total: Counter = Counter()

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            done = 0
            while time.monotonic() < end and (rounds is None or done < rounds):
                total.update(await one_round(client, model, rng, max_tokens, think))
                done += 1
                if pause:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return dict(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=None, help="rounds per client at most")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-think", action="store_true", help="skip the completions that think")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a client's rounds")
    a = p.parse_args(argv)
    seen = asyncio.run(run_mixed(a.url, concurrency=a.concurrency, duration=a.duration, rounds=a.rounds,
                                 max_tokens=a.max_tokens, think=not a.no_think, pause=a.pause))
    print(json.dumps({"statuses": seen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
