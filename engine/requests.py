"""The engine's public request types: what a caller submits and the events it gets back.

A caller (the HTTP layer, a benchmark, the offline evaluation) builds a
:class:`GenerationRequest`, hands it to :meth:`engine.loop.scheduler.Engine.submit`
and reads the :class:`RequestHandle` it gets back: token events, thought
events when the request thinks, and exactly one :class:`FinishEvent` last,
whatever way the request ends. Events are produced on the engine thread and
delivered to the caller's event loop by :class:`Outbox`, one wake-up per loop
and engine step.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engine.sampling import SamplingParams
from engine.thinking import ThinkParams, ThinkTotals, ThoughtEvent


class RequestRejected(Exception):
    """The engine did not accept a request; nothing was queued and no lease is held."""


class EngineOverloaded(RequestRejected):
    """The waiting queue is full; retry later."""


class EngineDead(RequestRejected):
    """The engine thread is not running."""


class EmptyPrompt(RequestRejected, ValueError):
    """Nothing to feed: no prompt tokens and no pending session tokens."""


class InvalidRequest(RequestRejected, ValueError):
    """A field is outside what the model can take; ``param`` names it (as the HTTP API spells it)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(RequestRejected, ValueError):
    """Session history plus prompt leave no room to generate within the context limit."""

    def __init__(self, history: int, prompt: int, limit: int):
        super().__init__(f"this model's maximum context length is {limit} tokens; the request has "
                         f"{history + prompt} ({history} of session history + {prompt} of prompt), "
                         f"leaving no room to generate")
        self.history, self.prompt, self.limit = history, prompt, limit


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    session_id: str | None = None  # continue this session: the engine leases it on submit, releases it at the end
    owner: str | None = None  # who asks (session ownership); another owner's session is not found
    prefix_boundaries: Sequence[int] = ()  # chat: token offsets where cached states may be reused / stored
    think: ThinkParams | None = None  # deliberate with the planner while generating


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text released by this token (may be empty: held for a stop string or an unfinished character)
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    time: float


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    think: ThinkTotals | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FinishEvent:
    reason: str  # "stop", "length", "cancelled" or "error"
    text: str  # text released at the end (held-back text, a final partial character)
    usage: Usage
    time: float
    error: str | None = None


Event = TokenEvent | ThoughtEvent | FinishEvent

INT64_MAX = 2**63 - 1


def check_request(request: GenerationRequest, vocab: int, max_context: int) -> None:
    """Refuse (:class:`InvalidRequest`) what torch could not take, before it reaches torch.

    One request's bad value must fail that request at submission, never the
    batch it would have joined.
    """
    bad = [t for t in request.prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
    if bad:
        raise InvalidRequest(f"token ids must be in [0, {vocab}); got {bad[:5]}", "prompt")
    if any(not (isinstance(t, int) and 0 <= t < vocab) for t in request.stop_token_ids):
        raise InvalidRequest(f"stop token ids must be in [0, {vocab})", "stop_token_ids")
    if not 1 <= request.max_tokens <= max_context:
        raise InvalidRequest(f"max_tokens must be in [1, {max_context}] (the context limit)", "max_tokens")
    p = request.params
    for name, value in (("temperature", p.temperature), ("top_p", p.top_p),
                        ("repetition_penalty", p.repetition_penalty)):
        if not math.isfinite(value):
            raise InvalidRequest(f"{name} must be a finite number", name)
    if not 0 <= p.top_k <= vocab:
        raise InvalidRequest(f"top_k must be in [0, {vocab}] (the vocabulary size; 0: no limit)", "top_k")
    if p.seed is not None and not 0 <= p.seed <= INT64_MAX:
        raise InvalidRequest(f"seed must be in [0, {INT64_MAX}]", "seed")
    if p.logprobs is not None and not 0 <= p.logprobs <= vocab:
        raise InvalidRequest(f"logprobs must be in [0, {vocab}]", "logprobs")


class EngineObserver:
    """Hooks the engine calls from its thread (metrics live outside the engine)."""

    def on_step(self, decode_batch: int, prefill_tokens: int, running: int, waiting: int) -> None: ...

    def on_finish(self, reason: str) -> None: ...

    def on_injection(self, result: str, confidence: float, a_eff: float, realised_lag: int) -> None: ...


class RequestHandle:
    """The caller's side of one request: its events, and :meth:`cancel`."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.id = next(self._ids)
        self.request = request
        self.loop = loop
        self.submitted = time.monotonic()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        # Set by the engine at admission, before the first event is sent (usage while streaming): the prompt as
        # usage counts it (session history included) and the tokens of it already in the start state.
        self.prompt_tokens: int | None = None
        self.cached_tokens = 0

    def cancel(self) -> None:
        """Ask the engine to drop the request; it leaves the batch within one step and still ends with a FinishEvent."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def next_event(self) -> Event:
        return await self._queue.get()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Events in batches of whatever has arrived (one write per batch), until the FinishEvent.

        A consumer that stops early (a client disconnect) cancels the request.
        """
        finished = False
        try:
            while not finished:
                batch = [await self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                finished = isinstance(batch[-1], FinishEvent)
                yield batch
        finally:
            if not finished:
                self.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """Events until (and including) the FinishEvent."""
        async for batch in self.batches():
            for event in batch:
                yield event

    def _deliver(self, event: Event) -> None:
        self._queue.put_nowait(event)


class Outbox:
    """Events of the current engine step, per event loop (engine thread only).

    Delivered with one ``call_soon_threadsafe`` per loop and step rather than one per token: each call writes to
    the loop's wake-up socket (a system call on the engine thread, 10% of its time at 32 streams) and wakes the
    loop, which takes the GIL. A loop that has not yet run the previous delivery gets the new events appended to
    it, with no second wake-up: the engine never waits for a busy loop, and the loop drains all it is owed at once.
    """

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
        self._lock = threading.Lock()
        self._scheduled: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}  # not yet run

    def emit(self, handle: RequestHandle, event: Event) -> None:
        self._items.setdefault(handle.loop, []).append((handle, event))

    def flush(self) -> None:
        while self._items:
            loop, items = self._items.popitem()
            with self._lock:
                waiting = self._scheduled.get(loop)
                if waiting is not None:  # that loop has a delivery queued: it takes these too
                    waiting.extend(items)
                    continue
                self._scheduled[loop] = items
            try:
                loop.call_soon_threadsafe(self._deliver, loop)
            except RuntimeError:  # that event loop is closed: nobody listens to these requests any more
                with self._lock:
                    self._scheduled.pop(loop, None)
                for handle, _ in items:
                    handle.cancel()

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        """On ``loop``: everything owed to it, in the order it was emitted."""
        with self._lock:
            items = self._scheduled.pop(loop)
        for handle, event in items:
            handle._deliver(event)
