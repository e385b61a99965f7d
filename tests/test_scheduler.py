"""The engine loop and session store without HTTP: batching, prefill interleaving, stops, caches."""

from __future__ import annotations

import asyncio

import pytest

from engine.loop.scheduler import Engine
from engine.requests import (
    ContextLengthExceeded,
    EmptyPrompt,
    EngineDead,
    EngineOverloaded,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
)
from engine.sampling import SamplingParams
from engine.sessions import PrefixCache, SessionBusy, SessionNotFound, SessionStore, SessionTooLarge
from engine.text.stops import StopMatcher
from engine.text.tokenizer import ByteTokenizer
from tests.conftest import make_model, reference_greedy

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model(seed=21, vocab_size=TOK.vocab_size)


async def run(engine: Engine, prompt, n: int, **kw) -> tuple[list[TokenEvent], FinishEvent]:
    handle = engine.submit(GenerationRequest(prompt_ids=list(prompt), max_tokens=n, ignore_eos=True,
                                             params=SamplingParams(temperature=0), **kw))
    events = [e async for e in handle.events()]
    return events[:-1], events[-1]


def with_engine(model, coro_fn, **kw):
    async def main():
        engine = Engine(model, TOK, **kw)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        try:
            return await coro_fn(engine)
        finally:
            engine.shutdown()

    return asyncio.run(main())


def test_batched_engine_output_equals_plain_greedy(model):
    prompts = [TOK.encode(f"prompt {i} " * (1 + i % 4)) for i in range(10)]

    async def go(engine):
        return await asyncio.gather(*[run(engine, p, 12) for p in prompts])

    results = with_engine(model, go, max_running=4, prefill_chunk=7)
    for p, (events, fin) in zip(prompts, results):
        assert [e.token_id for e in events] == reference_greedy(model, p, 12)
        assert fin.reason == "length" and fin.usage.completion_tokens == 12 and fin.usage.prompt_tokens == len(p)


def test_long_prompt_does_not_freeze_running_streams(model):
    async def go(engine):
        short = engine.submit(GenerationRequest(prompt_ids=TOK.encode("hi"), max_tokens=60, ignore_eos=True,
                                                params=SamplingParams(temperature=0)))
        first = await short.next_event()
        long_prompt = list(range(200)) * 10  # 2000 tokens, 16 tokens per step
        long = engine.submit(GenerationRequest(prompt_ids=long_prompt, max_tokens=1, ignore_eos=True))
        short_times = [first.time] + [e.time async for e in short.events() if isinstance(e, TokenEvent)]
        long_events = [e async for e in long.events()]
        return short_times, long_events[0].time

    short_times, long_first = with_engine(model, go, prefill_chunk=16)
    # The 2000-token prompt needs 125 steps of prefill: the short stream kept going meanwhile.
    assert len(short_times) == 60
    assert sum(t < long_first for t in short_times) >= 30


def test_overload_raises_and_cancel_leaves_within_a_step(model):
    async def go(engine):
        a = engine.submit(GenerationRequest(prompt_ids=[1], max_tokens=30000, ignore_eos=True))
        b = engine.submit(GenerationRequest(prompt_ids=[2], max_tokens=30000, ignore_eos=True))
        with pytest.raises(EngineOverloaded):
            engine.submit(GenerationRequest(prompt_ids=[3], max_tokens=1))
        await a.next_event()
        a.cancel()
        fin = [e async for e in a.events()][-1]
        b.cancel()
        fin_b = [e async for e in b.events()][-1]
        return fin, fin_b, engine.num_running

    fin, fin_b, running = with_engine(model, go, max_running=1, max_waiting=1)
    assert fin.reason == "cancelled" and fin_b.reason == "cancelled" and running == 0


def test_session_resume_and_cancel_keep_consistent_state(model):
    async def go(engine):
        s = engine.sessions.create(None)
        ev1, _ = await run(engine, TOK.encode("abc"), 5, session_id=s.id)
        ev2, fin2 = await run(engine, TOK.encode("de"), 4, session_id=s.id)
        return s, [e.token_id for e in ev1], [e.token_id for e in ev2], fin2

    s, out1, out2, fin2 = with_engine(model, go)
    full = TOK.encode("abc") + out1 + TOK.encode("de")
    assert out2 == reference_greedy(model, full, 4)
    assert s.n_tokens == len(full) + 4 and s.pending == [out2[-1]] and not s.busy
    assert fin2.usage.cached_tokens == len(TOK.encode("abc")) + 5 - 1


def test_prefix_cache_reuses_a_conversation(model):
    first_prompt = TOK.encode("user: hello\n")

    async def go(engine):
        ev, _ = await run(engine, first_prompt, 6, prefix_boundaries=[len(first_prompt)])
        reply = [e.token_id for e in ev]
        follow = first_prompt + reply + TOK.encode("user: more\n")
        boundary = len(first_prompt) + len(reply)
        ev2, fin2 = await run(engine, follow, 5, prefix_boundaries=[len(first_prompt), boundary, len(follow)])
        return follow, [e.token_id for e in ev2], fin2

    cache = PrefixCache()
    follow, out, fin = with_engine(model, go, prefix_cache=cache)
    assert out == reference_greedy(model, follow, 5)
    assert cache.hits == 1 and fin.usage.cached_tokens == len(first_prompt) + 6 - 1


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abcE") == ("abc", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Q") == ("ENQ", False)
    assert m.feed("zzx") == ("zz", False)
    assert m.feed("y tail") == ("", True)
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)


def test_session_store_bounds():
    clock = [0.0]
    shape_model = make_model(d_model=8, n_layer=1)
    one = shape_model.allocate_state(1)
    store = SessionStore(max_bytes=one.nbytes * 2, ttl_seconds=10, clock=lambda: clock[0])
    sessions = []
    for _ in range(3):
        s = store.create("me")
        store.lease(s.id, "me")
        store.release(s, state=one.clone(), pending=[1], n_tokens=2)
        sessions.append(s)
        clock[0] += 1
    assert len(store) == 2 and store.evictions == 1  # the least recently used went first
    with pytest.raises(SessionNotFound):
        store.get(sessions[0].id, "me")
    with pytest.raises(SessionNotFound):
        store.get(sessions[1].id, "someone else")
    store.lease(sessions[1].id, "me")
    with pytest.raises(SessionBusy):
        store.lease(sessions[1].id, "me")
    with pytest.raises(SessionBusy):
        store.delete(sessions[1].id, "me")
    store.release(sessions[1])
    clock[0] += 11
    assert len(store) == 0  # idle past the TTL
    tiny = SessionStore(max_bytes=one.nbytes // 2)
    s = tiny.create(None)
    tiny.lease(s.id, None)
    with pytest.raises(SessionTooLarge):
        tiny.release(s, state=one.clone(), pending=[], n_tokens=1)


def test_session_metadata_counts_in_the_budget_and_has_a_cap():
    store = SessionStore(max_bytes=10_000, max_metadata_bytes=1_000)
    with pytest.raises(SessionTooLarge, match="limit is 1000 bytes"):
        store.create(None, metadata={"k": "x" * 1_000})
    assert len(store) == 0  # nothing was created
    for i in range(40):  # ~500 bytes each: the budget holds about 20
        store.create(None, metadata={"k": "x" * 490, "i": str(i)})
    assert store.nbytes <= 10_000 and 15 <= len(store) <= 20 and store.evictions >= 20
    assert store.create(None).describe()["state_bytes"] == 0


# Lease ownership and final events --------------------------------------------------------
def test_the_engine_holds_a_session_lease_for_exactly_the_life_of_its_request(model):
    async def go(engine):
        s = engine.sessions.create(None)
        handle = engine.submit(GenerationRequest(prompt_ids=[1, 2], max_tokens=30000, ignore_eos=True,
                                                 session_id=s.id))
        await handle.next_event()
        busy_while_running = s.busy
        with pytest.raises(SessionBusy):  # a second request on the same session is refused, holding nothing
            engine.submit(GenerationRequest(prompt_ids=[3], session_id=s.id))
        handle.cancel()
        fin = [e async for e in handle.events()][-1]
        with pytest.raises(SessionNotFound):
            engine.submit(GenerationRequest(prompt_ids=[3], session_id=s.id, owner="someone else"))
        with pytest.raises(ContextLengthExceeded):  # refused after leasing: the lease goes back
            engine.submit(GenerationRequest(prompt_ids=[1] * engine.max_context, session_id=s.id))
        with pytest.raises(EmptyPrompt):
            engine.submit(GenerationRequest(prompt_ids=[], session_id=engine.sessions.create(None).id))
        return s, busy_while_running, fin

    s, busy_while_running, fin = with_engine(model, go)
    assert busy_while_running and fin.reason == "cancelled"
    assert not s.busy and s.n_tokens >= 3  # written back: the prompt and what was generated before the cancel


class FailingSteps:
    """Wraps a model so that chosen decode steps raise (a fault in one step of the batch)."""

    def __init__(self, model, fail_at: set[int]):
        self.model, self.fail_at, self.steps = model, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eval(self):
        return self

    def step(self, tokens, state):
        self.steps += 1
        if self.steps in self.fail_at:
            raise RuntimeError("injected step failure")
        return self.model.step(tokens, state)


def test_a_failed_step_ends_every_request_in_flight_once_and_gives_every_lease_back(model):
    async def go(engine):
        sessions = [engine.sessions.create(None) for _ in range(3)]
        handles = [engine.submit(GenerationRequest(prompt_ids=[i + 1], max_tokens=50, ignore_eos=True,
                                                   session_id=s.id)) for i, s in enumerate(sessions)]
        handles.append(engine.submit(GenerationRequest(prompt_ids=[9], max_tokens=50, ignore_eos=True)))
        finals = []
        for h in handles:
            finals.append([e async for e in h.events() if isinstance(e, FinishEvent)])
        after, _ = await run(engine, [5, 6], 4)  # the engine keeps serving
        return sessions, finals, after

    failing = FailingSteps(model, fail_at={3})
    sessions, finals, after = with_engine(failing, go)
    assert all(len(f) == 1 for f in finals)  # exactly one final event each
    assert {f[0].reason for f in finals} == {"error"} and "injected step failure" in finals[0][0].error
    assert not any(s.busy for s in sessions)
    assert [e.token_id for e in after] == reference_greedy(model, [5, 6], 4)


def test_shutdown_ends_requests_in_flight_with_a_final_event(model):
    async def go():
        engine = Engine(model, TOK)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        s = engine.sessions.create(None)
        handle = engine.submit(GenerationRequest(prompt_ids=[1], max_tokens=30000, ignore_eos=True, session_id=s.id))
        await handle.next_event()
        await asyncio.to_thread(engine.shutdown)
        rest = [e async for e in handle.events()]
        with pytest.raises(EngineDead):
            engine.submit(GenerationRequest(prompt_ids=[1]))
        return s, rest[-1]

    s, fin = asyncio.run(go())
    assert fin.reason == "error" and "shutting down" in fin.error and not s.busy
