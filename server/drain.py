"""Graceful drain on SIGTERM/SIGINT: stop admitting, let requests in flight finish, end the rest, then exit 0.

uvicorn's own handling of SIGTERM closes the listening socket at once (a
request arriving then is refused at TCP, so neither a client nor a proxy can
tell "shutting down" from "dead") and cancels responses still running after
its graceful timeout (a non-streamed request got a bare 500, a stream lost
its final event), then re-raises the signal (exit status -15). Here the first
signal only starts a drain, run on the event loop:

1. :attr:`Drain.draining` is set: new generations get 503 with
   ``Retry-After`` and ``Connection: close`` (:meth:`server.serving.Serving.start`),
   ``/ready`` answers 503 (a load balancer takes the replica out), ``/health``
   stays 200, ``crsm_draining`` reads 1. The socket stays open meanwhile.
2. Requests in flight run on until they finish or ``drain_timeout`` passes.
3. The rest are cancelled: the engine ends each with its final event
   (``finish_reason: "abort"``, ``[DONE]``) and writes its session back (state
   and tokens as far as they got, :meth:`engine.loop.scheduler.Engine._retire`).
4. Once their final events are written, uvicorn's normal shutdown runs
   (close the socket, finish connections, the app's lifespan: engine, planner)
   and the process exits with status 0, at once: not waiting for threads
   still blocked (a planner worker still starting holds one for as long as
   its start takes) nor for the interpreter's teardown (1.6-4 s with torch
   here), which would come out of a container's stop grace period.

A second signal skips the rest of step 2 (the streams still end with their
final event); a third exits at once (status 1), as uvicorn's forced exit does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import uvicorn

if TYPE_CHECKING:
    from engine.loop.scheduler import Engine
    from server.serving import Generation

log = logging.getLogger("server.drain")

END_GRACE_SECONDS = 5.0  # after the cancel: time for the engine to end the rest and their final events to go out
POLL_SECONDS = 0.05
RETRY_AFTER_SECONDS = 5  # a draining replica does not come back; another one (or its restart) will answer


class Drain:
    """The generations whose responses are still being written, and whether the server is draining."""

    def __init__(self, engine: Engine, on_change: Callable[[bool], None] = lambda draining: None):
        self.engine = engine
        self.draining = False
        self._on_change = on_change
        self._inflight: set[Generation] = set()

    def track(self, gen: Generation) -> None:
        """A generation was accepted; its response writer calls :meth:`done` when it has its final event."""
        self._inflight.add(gen)

    def done(self, gen: Generation) -> None:
        """The response of ``gen`` has its final event, or was abandoned (client gone); idempotent."""
        self._inflight.discard(gen)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self, timeout: float, hurry: asyncio.Event | None = None) -> None:
        """Steps 1-3 of the module docstring; returns once every final event is out (or the end grace passed)."""
        hurry = hurry or asyncio.Event()
        if not self.draining:
            self.draining = True
            self._on_change(True)
            log.warning("draining: %d request(s) in flight may finish for up to %.1f s; new requests get 503 "
                        "(signal again to end them now)", self.in_flight, timeout)
        started = time.monotonic()
        await _until(lambda: not self._inflight or hurry.is_set(), timeout)
        if self._inflight:
            log.warning("drain: ending %d request(s) still in flight after %.1f s with a final event",
                        self.in_flight, time.monotonic() - started)
            for gen in list(self._inflight):
                gen.handle.cancel()
        engine = self.engine
        await _until(lambda: not self._inflight and engine.num_running + engine.num_waiting == 0, END_GRACE_SECONDS)
        if self._inflight:
            log.error("drain: %d response(s) had not written their final event %.1f s after the cancel",
                      self.in_flight, END_GRACE_SECONDS)
        log.warning("drained in %.2f s", time.monotonic() - started)


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT runs :meth:`Drain.run` before uvicorn's own shutdown.

    The signal handler only counts signals; :meth:`on_tick` (uvicorn's main loop, every 0.1 s, on the event loop)
    starts the drain and asks uvicorn to exit once it is over. Unlike uvicorn's own handler this one does not have
    the signal re-raised after the shutdown (which ended the process with -15): a drained server exits with 0,
    from :meth:`serve`, as soon as the app has shut down.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float, exit_when_stopped: bool = True):
        super().__init__(config)
        self.exit_when_stopped = exit_when_stopped
        self.drain, self.drain_timeout = drain, drain_timeout
        self._signals = 0
        self._task: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals >= 3:  # the operator insists: uvicorn's forced exit, without the lifespan's shutdown
            log.warning("third %s: exiting now", signal.Signals(sig).name)
            self.force_exit = self.should_exit = True

    async def serve(self, sockets=None) -> None:
        await super().serve(sockets)
        if self.started and self.exit_when_stopped:  # the lifespan has run: nothing is left to finish
            exit_now(1 if self.force_exit else 0)

    async def on_tick(self, counter: int) -> bool:
        if self._signals and self._task is None:
            self._hurry = asyncio.Event()
            self._task = asyncio.create_task(self.drain.run(self.drain_timeout, self._hurry))
        if self._signals >= 2 and self._hurry is not None and not self._hurry.is_set():
            log.warning("second signal: ending the requests in flight now")
            self._hurry.set()
        if self._task is not None and self._task.done():
            if not self._task.cancelled() and self._task.exception() is not None:
                log.error("drain failed", exc_info=self._task.exception())
            self.should_exit = True
        return await super().on_tick(counter)


def exit_now(status: int) -> NoReturn:
    """Exit without waiting for other threads or the interpreter's teardown; logs and output flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
