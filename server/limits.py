"""Transport-level bounds: what a client may cost the server before a route sees its request.

* :class:`LimitsAndErrorCounts`, a pure ASGI middleware: the API key is checked before any body byte is read
  (401), the body size is counted on the bytes actually received, chunked or not (413), the body must arrive
  whole within ``ServerConfig.body_timeout`` of its headers (408), and every answer >= 400 is counted by status.
  Any answer sent before the request body was read whole carries ``Connection: close``, so uvicorn closes the
  connection after it instead of reading (and discarding) the rest of the body.
* :func:`header_timeout_protocol`: uvicorn's h11 protocol with a deadline on the request headers (uvicorn has
  none): a connection that has not completed a request's headers within the deadline is closed.

It stays pure ASGI on purpose: Starlette's BaseHTTPMiddleware wraps ``receive`` and hides client disconnects
from the endpoints, which cancel generation on them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.auth import key_is_valid, refusal
from server.errors import error_body

if TYPE_CHECKING:
    from server.metrics import Metrics
    from server.serving import ServerConfig

log = logging.getLogger(__name__)

# Served without a key by the middleware; whether they need one is their routes' business.
HEADER_TIMEOUT_SECONDS = 10.0  # the default deadline on a request's headers (--header-timeout)
UNPROTECTED_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                               "/openapi.json"})


class LimitsAndErrorCounts:
    """Pure ASGI middleware: API key before the body, body size and read deadline, error answers counted."""

    def __init__(self, app, metrics: Metrics, config: ServerConfig):
        self.app, self.metrics, self.config = app, metrics, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await _Exchange(self, scope, receive, send).run()


class _Exchange:
    """One HTTP request through the middleware: what was received of its body, and what was answered."""

    def __init__(self, limits: LimitsAndErrorCounts, scope, receive, send):
        self.limits, self.scope, self._receive, self._send = limits, scope, receive, send
        self.config = limits.config
        self.content_length: int | None = None
        self.authorization: str | None = None
        chunked = False
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.isdigit():
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"authorization" and self.authorization is None:
                self.authorization = value.decode("latin-1")
        self.body_done = not chunked and not self.content_length  # no body, or all of it passed through receive
        self.received = 0  # body bytes received so far
        self.started = False  # a response has started
        self.answered = False  # the middleware answered (or gave up on) this request: the app's messages are dropped
        self.deadline = asyncio.get_running_loop().time() + self.config.body_timeout

    async def run(self) -> None:
        keys = self.config.api_keys
        if keys and self.scope["path"] not in UNPROTECTED_PATHS and not key_is_valid(self.authorization, keys):
            refused = refusal("API key")
            return await self.answer(refused.status, refused.message, code=refused.code, headers=refused.headers)
        limit = self.config.max_body_bytes
        if self.content_length is not None and self.content_length > limit:
            return await self.answer(413, f"request body over {limit} bytes", code="body_too_large")
        try:
            await self.limits.app(self.scope, self.receive, self.send)
        except Exception:
            if not self.answered:
                raise
            # The app failed on the disconnect it was handed after the middleware's own answer: nothing to add.

    async def answer(self, status: int, message: str, code: str | None, headers: dict[str, str] | None = None) -> None:
        """Send an error answer of the middleware's own; past this point the app's messages are dropped."""
        self.answered = True
        response = JSONResponse(error_body(status, message, code=code), status_code=status, headers=headers)
        await self._start(response.raw_headers, status)
        await self._send({"type": "http.response.body", "body": response.body, "more_body": False})

    async def _start(self, headers: list[tuple[bytes, bytes]], status: int) -> None:
        self.started = True
        if not self.body_done:  # stop reading: uvicorn closes the connection after this answer
            headers = [*headers, (b"connection", b"close")]
        if status >= 400:
            self.limits.metrics.error(status)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def send(self, message) -> None:
        """The app's ``send``."""
        if self.answered:
            return
        if message["type"] == "http.response.start":
            await self._start(list(message.get("headers", ())), message["status"])
        else:
            await self._send(message)

    async def receive(self):
        """The app's ``receive``: the body bounded in size and in time."""
        if self.answered:
            return {"type": "http.disconnect"}
        if self.body_done:
            return await self._receive()
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(remaining, 0.0))
        except asyncio.TimeoutError:
            self.limits.metrics.slow_client("body")
            log.debug("request body of %s %s not received within %g s", self.scope["method"], self.scope["path"],
                      self.config.body_timeout)
            return await self._give_up(408, f"request body not received within {self.config.body_timeout:g} s",
                                       "body_timeout")
        if message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.config.max_body_bytes:
            return await self._give_up(413, f"request body over {self.config.max_body_bytes} bytes", "body_too_large")
        if not message.get("more_body", False):
            self.body_done = True
        return message

    async def _give_up(self, status: int, message: str, code: str):
        """Answer ``status`` if no response has started (else the app's response is left incomplete, which makes
        uvicorn close the connection); the app sees the client gone."""
        if self.started:
            self.answered = True
        else:
            await self.answer(status, message, code)
        return {"type": "http.disconnect"}


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers.

    The timer runs while the client owes the headers of a request (h11's client state is IDLE): from the
    connection's start, and from the first bytes of each later request. Between requests uvicorn's own
    ``timeout_keep_alive`` bounds the idle connection. On expiry the transport is closed, without an answer.
    """

    header_timeout: float = HEADER_TIMEOUT_SECONDS
    on_header_timeout: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        else:
            self._stop_header_timer()

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.on_header_timeout()
        log.debug("closing a connection whose request headers did not arrive within %g s", self.header_timeout)
        self.transport.close()


def header_timeout_protocol(seconds: float, on_timeout: Callable[[], None]) -> type[H11Protocol]:
    """An ``http=`` protocol class for ``uvicorn.run``: h11, closing connections whose request headers take longer
    than ``seconds``; ``on_timeout()`` is called for each."""
    return type("HeaderTimeoutH11Protocol", (_HeaderTimeoutProtocol,),
                {"header_timeout": seconds, "on_header_timeout": staticmethod(on_timeout)})
