"""Fault injection: one request's failure never touches another's.

A wrapper around the engine's prefill and sampling makes them raise whenever
a poisoned request is in the batch (at a random token, for a random few of
many concurrent streams, round after round). Every request must still end
with exactly one final event, every session lease must come back, the
poisoned requests end with an error and leave their session as it was, and
every other stream's tokens are exactly what it would have produced alone.
"""

from __future__ import annotations

import asyncio
import random

import pytest

import engine.loop.scheduler as scheduler
from engine.loop.scheduler import Engine
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.text.tokenizer import ByteTokenizer
from tests.conftest import make_model, reference_greedy

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model(seed=5, vocab_size=TOK.vocab_size)


class Faults:
    """Poisoned requests (by identity): prefill raises for some, sampling from their k-th token for others."""

    def __init__(self):
        self.at_token: dict[int, int] = {}
        self.in_prefill: set[int] = set()
        self.raised = 0

    def sample_rows(self, seqs, logits, vocab):
        if any(len(s.generated) >= self.at_token.get(id(s.req), 1 << 30) for s in seqs):
            self.raised += 1
            raise RuntimeError("injected sampling fault")
        return REAL_SAMPLE(seqs, logits, vocab)

    def prefill_rows(self, model, chosen):
        if any(id(seq.req) in self.in_prefill for seq, _ in chosen):
            self.raised += 1
            raise RuntimeError("injected prefill fault")
        return REAL_PREFILL(model, chosen)


REAL_SAMPLE, REAL_PREFILL = scheduler.sample_rows, scheduler.prefill_rows


def test_a_failing_row_fails_alone_under_concurrent_streams(model, monkeypatch):
    faults = Faults()
    monkeypatch.setattr(scheduler, "sample_rows", faults.sample_rows)
    monkeypatch.setattr(scheduler, "prefill_rows", faults.prefill_rows)
    rng = random.Random(13)
    n_tokens = 12

    async def one_round(engine: Engine, round_: int):
        requests, sessions = [], []
        for i in range(16):
            session = engine.sessions.create(None) if i % 2 else None
            prompt = TOK.encode(f"round {round_} stream {i}: " + "x" * rng.randrange(0, 40))
            requests.append(GenerationRequest(prompt, SamplingParams(temperature=0), max_tokens=n_tokens,
                                              ignore_eos=True, session_id=session.id if session else None))
            sessions.append(session)
        poisoned = rng.sample(range(16), 4)
        faults.in_prefill.add(id(requests[poisoned[0]]))
        for i in poisoned[1:]:
            faults.at_token[id(requests[i])] = rng.randrange(1, n_tokens)
        handles = [engine.submit(r) for r in requests]
        events = await asyncio.gather(*[collect(h) for h in handles])
        return requests, sessions, set(poisoned), events

    async def collect(handle):
        return [e async for e in handle.events()]

    async def main():
        engine = Engine(model, TOK, max_running=8, prefill_chunk=64)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        try:
            return [await one_round(engine, r) for r in range(3)], engine.num_running
        finally:
            engine.shutdown()

    rounds, running = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert faults.raised >= 12 and running == 0
    for requests, sessions, poisoned, events in rounds:
        for i, (request, session, evs) in enumerate(zip(requests, sessions, events)):
            finals = [e for e in evs if isinstance(e, FinishEvent)]
            assert len(finals) == 1 and evs[-1] is finals[0]  # exactly one final event, and it is the last
            if session is not None:
                assert not session.busy  # the lease came back
            if i in poisoned:
                assert finals[0].reason == "error" and "injected" in finals[0].error
                if session is not None:
                    assert session.n_tokens == 0 and session.state is None  # left as it was
            else:
                tokens = [e.token_id for e in evs if isinstance(e, TokenEvent)]
                assert finals[0].reason == "length" and tokens == reference_greedy(model, request.prompt_ids, n_tokens)
