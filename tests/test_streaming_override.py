"""server/streaming.py overrides a private method of sse-starlette's EventSourceResponse (``_send_with_timeout``,
to skip a cancel scope per frame when there is no send timeout). A rename upstream would leave the override dead
code and a signature change would break every stream: this pins the shape it relies on, and that the override
really sends the frame and still defers to the library when a timeout is set."""

from __future__ import annotations

import asyncio
import inspect

from sse_starlette.sse import EventSourceResponse

from server.streaming import _EventStream


def test_the_overridden_method_still_exists_upstream_with_the_same_parameters():
    base = EventSourceResponse._send_with_timeout
    assert inspect.iscoroutinefunction(base)
    assert list(inspect.signature(base).parameters) == ["self", "send", "message"]
    assert _EventStream._send_with_timeout is not base


def test_frames_go_straight_to_send_without_a_timeout_and_through_the_library_with_one():
    async def body():
        yield b"data: 1\n\n"

    sent = []

    async def send(message):
        sent.append(message)

    async def run():
        stream = _EventStream(body(), send_timeout=None)
        await stream._send_with_timeout(send, {"type": "http.response.body", "body": b"x", "more_body": True})
        timed = _EventStream(body(), send_timeout=5)
        await timed._send_with_timeout(send, {"type": "http.response.body", "body": b"y", "more_body": True})

    asyncio.run(run())
    assert [m["body"] for m in sent] == [b"x", b"y"]
