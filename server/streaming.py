"""SSE plumbing: engine events in batches, the OpenAI and ``/think`` event streams, and their response.

Streams are ``sse_starlette.EventSourceResponse`` bodies fed pre-encoded
frames (bytes pass through unchanged), one write per batch of events. The
response pings (a comment line) every ``sse_ping_seconds`` so proxies keep a
quiet stream open (a ``/think`` waiting on its plan) and cancels the generation
when the client hangs up (the body's generator is cancelled, which cancels the
request). Every response tells the drain (:mod:`server.drain`) when it is done
with its generation: on SIGTERM the drain lets streams run up to
``--drain-timeout``, then cancels them, and each still ends with its final
event (``finish_reason: "abort"``) and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from engine.requests import FinishEvent, TokenEvent
from engine.thinking import ThoughtEvent
from server.drain import END_GRACE_SECONDS
from server.errors import error_body
from server.formatting import (
    SSE_DONE,
    OpenAIFormat,
    finish_reason,
    sse,
    sse_model,
    thought_of,
    usage_json,
    usage_of,
)
from server.responses import PromptTokensDetails, ThinkDone, Usage
from server.serving import Generation, Serving

DISCONNECT_POLL_SECONDS = 0.25
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_doc(*models: type, done: bool = False) -> dict:
    """OpenAPI of a streamed 200: ``text/event-stream`` whose ``data:`` lines carry one of ``models`` (JSON).

    The media type's ``schema`` describes one event (OpenAPI 3.1 and 3.2 read it so for event streams): ``data``
    is a string whose ``contentSchema`` is the JSON payload; ``data: [DONE]`` ends the OpenAI streams. The
    schemas live in ``components`` (``server.app`` adds every model of ``STREAM_MODELS`` there)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"oneOf": refs} if len(refs) > 1 else refs[0]}
    data = {"anyOf": [{"const": "[DONE]"}, payload]} if done else payload
    event = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": data, "id": {"type": "string"},
                            "retry": {"type": "integer"}}}
    what = "server-sent events whose `data:` is one of the text/event-stream schemas"
    if done:
        what = f"application/json, or with `stream: true` {what}, ending with `data: [DONE]`"
    return {"description": what[0].upper() + what[1:], "content": {"text/event-stream": {"schema": event}}}


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


class _EventStream(EventSourceResponse):
    """``EventSourceResponse`` writing each frame straight to ``send`` when there is no per-write timeout.

    The library wraps every write in ``anyio.move_on_after(send_timeout)``: with no timeout (ours) that scope can
    never be cancelled, yet entering and leaving it costs each token a cancel scope, a task lookup and an async
    library sniff on the event loop, which shares the GIL with the engine's step. Pings, disconnects, the
    cooperative shutdown and the clean-up on a failed write are still the library's."""

    async def _send_with_timeout(self, send, message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def event_stream(serving: Serving, gen: Generation, body: AsyncGenerator[bytes, None]) -> EventSourceResponse:
    shutdown = anyio.Event()

    async def end_on_shutdown() -> None:
        """uvicorn is exiting while this stream runs (the drain, which runs first, has normally ended it):
        cancel the request now; the grace lets its final event out."""
        await shutdown.wait()
        gen.handle.cancel()

    return _EventStream(_released(serving, gen, body), headers=HEADERS, sep="\n",
                               ping=serving.config.sse_ping_seconds, ping_message_factory=_ping,
                               shutdown_event=shutdown, shutdown_grace_period=END_GRACE_SECONDS,
                               data_sender_callable=end_on_shutdown)


async def _released(serving: Serving, gen: Generation, body: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """``body``; then, however it ended (its last chunk written, or the client gone), the drain stops waiting
    for ``gen``."""
    try:
        async with aclosing(body) as chunks:
            async for chunk in chunks:
                yield chunk
    finally:
        serving.drain.done(gen)


def batches(gen: Generation) -> AsyncIterator[list[TokenEvent | ThoughtEvent | FinishEvent]]:
    """The request's events in batches of whatever has arrived (one write per batch); a consumer that goes
    away first (client disconnect) cancels the request (:meth:`engine.requests.RequestHandle.batches`)."""
    return gen.handle.batches()


async def collect(serving: Serving, gen: Generation, request: Request) -> tuple[list[TokenEvent], FinishEvent]:
    """All events of a non-streamed request; a client that hangs up cancels the generation."""

    async def gather() -> tuple[list[TokenEvent], FinishEvent]:
        events: list[TokenEvent] = []
        last = [0.0]
        try:
            async for batch in batches(gen):
                now = time.monotonic()
                for event in batch:
                    serving.observe(gen, event, last, now)
                    if isinstance(event, TokenEvent):
                        events.append(event)
                    elif isinstance(event, FinishEvent):
                        return events, event
            raise asyncio.CancelledError
        finally:
            serving.drain.done(gen)

    task = asyncio.create_task(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                gen.handle.cancel()
    finally:
        if not task.done():
            task.cancel()


def engine_error(event: FinishEvent) -> dict:
    return error_body(500, event.error or "generation failed", code="engine_error")


async def openai_events(serving: Serving, gen: Generation, fmt: OpenAIFormat, include_usage: bool,
                        continuous_usage: bool = False) -> AsyncGenerator[bytes, None]:
    """The SSE body of a streamed completion or chat completion: token chunks from one template, then exactly
    one final chunk (or error event), the usage chunk when asked for, and ``[DONE]``.

    ``continuous_usage`` (``stream_options.continuous_usage_stats``, vLLM's extension): every chunk carries
    ``usage`` with the completion tokens so far. The chat head (the role chunk) then waits for the first
    events, by which time the engine has admitted the request and counted its prompt (session included)."""
    template, with_logprobs, observe = fmt.template(continuous_usage), gen.logprobs is not None, serving.observe
    handle = gen.handle
    if not continuous_usage:
        head = fmt.head()
        if head:
            yield head
    last, offset, produced, head_due = [0.0], 0, 0, continuous_usage
    async for batch in batches(gen):
        out: list[bytes] = []
        now = time.monotonic()  # the batch is written as one frame right after: TTFT/ITL as the client sees them
        if head_due:  # the first batch: the head, with the prompt counted
            head_due = False
            prompt = handle.prompt_tokens if handle.prompt_tokens is not None else len(handle.request.prompt_ids)
            head = fmt.head(Usage(prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt,
                                  prompt_tokens_details=PromptTokensDetails(cached_tokens=handle.cached_tokens)))
            if head:
                out.append(head)
        for event in batch:
            observe(gen, event, last, now)
            if isinstance(event, TokenEvent):
                produced += 1
                if not (with_logprobs or event.text):
                    continue
                usage = usage_json(handle.prompt_tokens or 0, produced, handle.cached_tokens) \
                    if continuous_usage else b""
                if with_logprobs:
                    out.append(template.render(event.text, fmt.logprobs([event], offset), usage))
                    offset += len(event.text)
                else:
                    out.append(template.render(event.text, None, usage))
            elif isinstance(event, FinishEvent):
                out.append(sse(engine_error(event)) if event.reason == "error"
                           else sse_model(fmt.final_chunk(event, continuous_usage)))
                if include_usage:
                    out.append(sse_model(fmt.usage_chunk(event)))
                out.append(SSE_DONE)
            # ThoughtEvents: OpenAI clients see thinking in metrics and the final usage only
        if out:
            yield b"".join(out)


async def think_events(serving: Serving, gen: Generation, rid: str) -> AsyncGenerator[bytes, None]:
    """The SSE body of ``/think``: ``token`` and ``thought`` events, then one ``done`` (or ``error``) event."""
    last, index, observe = [0.0], 0, serving.observe
    session_id = gen.session_id
    async for batch in batches(gen):
        out: list[bytes] = []
        now = time.monotonic()
        for event in batch:
            observe(gen, event, last, now)
            if isinstance(event, TokenEvent):
                out.append(sse({"id": rid, "index": index, "token_id": event.token_id, "text": event.text}, "token"))
                index += 1
            elif isinstance(event, ThoughtEvent):
                out.append(sse_model(thought_of(event, rid, serving.tokenizer), "thought"))
            elif event.reason == "error":
                out.append(sse(engine_error(event), "error"))
            else:
                done = ThinkDone(id=rid, text=event.text, finish_reason=finish_reason(event), usage=usage_of(event),
                                 session_id=session_id)
                out.append(sse_model(done, "done"))
        if out:
            yield b"".join(out)
