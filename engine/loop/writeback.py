"""Write-behind for persistent session stores: the engine thread never waits on a disk or a network write.

Writing a session back to the directory store costs two fsyncs (about 20 ms
on the development VM) and to Redis a round trip plus the copy of the state
(3 ms; about 100 ms either way for a 130M-shaped state). Done on the engine
thread, every other stream stalls for that long each time any request ends.
Here one thread per engine does the write, then ends the lease, then sends the
request's final event, so a client that continues its session as soon as it
sees the final event still finds the new state and an idle lease.

Order: the engine hands a write over only after flushing its own outbox
(:meth:`WriteBehind.submit` is called from the engine's flush), so the final
event is scheduled on the request's event loop after every token event of the
request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from engine.requests import Outbox

log = logging.getLogger(__name__)


class WriteBehind:
    """One writer thread and the outbox its final events leave through (that thread's only)."""

    def __init__(self, name: str = "crsm-session-writer"):
        self._jobs: queue.Queue[Callable[[Outbox], None] | None] = queue.Queue()
        self._outbox = Outbox()
        self._closing = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[Outbox], None]) -> None:
        """Run ``job(outbox)`` on the writer thread; what it emits is flushed right after it.

        After :meth:`close` (an engine thread that outlived its shutdown's join) the job runs here, on the caller's
        thread: a late request still gets its write and its final event.
        """
        with self._closing:
            if not self._closed:
                self._jobs.put(job)
                return
        outbox = Outbox()
        try:
            job(outbox)
        finally:
            outbox.flush()

    @property
    def backlog(self) -> int:
        return self._jobs.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the writes handed over so far, then stop the thread (the engine's shutdown calls this last)."""
        with self._closing:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job(self._outbox)
            except Exception:  # a job reports its own failures; this thread must go on
                log.exception("session write-back job failed")
            finally:
                self._outbox.flush()
