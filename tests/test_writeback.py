"""Write-behind of persistent session stores: a slow write never stalls the other streams, and a request's final
event leaves only after its state is written and its lease is back."""

from __future__ import annotations

import asyncio
import threading

from engine.loop.scheduler import Engine
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.sessions.directory import DirectorySessionStore
from engine.text.tokenizer import ByteTokenizer
from tests.conftest import make_model, reference_greedy

TOK = ByteTokenizer()


class GatedDirectoryStore(DirectorySessionStore):
    """A real directory store whose write-back waits for a gate: a disk that takes as long as the test says."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def release(self, session, state=None, pending=None, n_tokens=None):
        if state is not None:
            self.writing.set()
            assert self.gate.wait(60), "the test never opened the gate"
        super().release(session, state=state, pending=pending, n_tokens=n_tokens)


def greedy(prompt, n: int, session_id: str | None = None) -> GenerationRequest:
    return GenerationRequest(prompt_ids=list(prompt), max_tokens=n, ignore_eos=True, session_id=session_id,
                             params=SamplingParams(temperature=0))


def test_a_slow_session_write_does_not_stall_other_streams_and_its_final_event_waits_for_it(tmp_path):
    model = make_model(seed=5, vocab_size=TOK.vocab_size)
    store = GatedDirectoryStore(tmp_path / "sessions", shape=model.state_shape(), model_id="test-model")
    assert store.persistent
    session = store.create(None)

    async def main():
        engine = Engine(model, TOK, sessions=store)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        try:
            writer = engine.submit(greedy(TOK.encode("first turn"), 4, session.id))
            writer_events: list = []

            async def read_writer():
                async for event in writer.events():
                    writer_events.append(event)

            reading = asyncio.create_task(read_writer())
            assert await asyncio.to_thread(store.writing.wait, 60), "the session's write never started"
            # The write is held; a stream without a session runs to its end meanwhile (the engine thread is free).
            other = engine.submit(greedy(TOK.encode("another stream"), 24))
            other_events = await asyncio.wait_for(_collect(other), 60)
            assert [e.token_id for e in other_events[:-1]] == reference_greedy(model, TOK.encode("another stream"), 24)
            assert not any(isinstance(e, FinishEvent) for e in writer_events), "final event before the write"
            assert len([e for e in writer_events if isinstance(e, TokenEvent)]) == 4  # its tokens did leave
            store.gate.set()
            await asyncio.wait_for(reading, 60)
            assert isinstance(writer_events[-1], FinishEvent) and writer_events[-1].reason == "length"
            # The final event came after the write: the session is idle and continues from the written state.
            follow = await asyncio.wait_for(_collect(engine.submit(greedy(TOK.encode(" and more"), 6, session.id))), 60)
        finally:
            store.gate.set()
            await asyncio.to_thread(engine.shutdown)
        return [e.token_id for e in writer_events[:-1]], [e.token_id for e in follow[:-1]]

    first, follow = asyncio.run(main())
    whole = TOK.encode("first turn") + first + TOK.encode(" and more")
    # the last sampled token of a turn is fed when the conversation continues (it is the session's pending token)
    assert first + follow == reference_greedy(model, TOK.encode("first turn"), 4)[:4] + \
        reference_greedy(model, whole, 6)
    store.close()


async def _collect(handle) -> list:
    return [event async for event in handle.events()]


def test_a_write_handed_over_after_close_still_runs_and_sends_its_final_event():
    """An engine thread that outlived its shutdown's join hands writes over late: they run in line, none is lost."""
    from engine.loop.writeback import WriteBehind
    from engine.requests import Outbox

    writer = WriteBehind()
    ran: list[str] = []
    writer.submit(lambda outbox: ran.append("before close"))
    writer.close()
    writer.submit(lambda outbox: ran.append("after close") or isinstance(outbox, Outbox))
    assert ran == ["before close", "after close"]
