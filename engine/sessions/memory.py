"""The memory session store: live states in this process (the default; gone with the process).

The store is bounded by a byte budget (states and metadata; a session's
metadata also has a cap of its own) and a TTL, evicts the least recently
used idle session first, and leases a session to one request at a time: a
second request gets :class:`SessionBusy` instead of racing on the state.
Thread-safe: the HTTP layer leases, the engine thread writes back.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from engine.sessions.base import (
    DEFAULT_MAX_METADATA_BYTES,
    Session,
    SessionBusy,
    SessionNotFound,
    SessionTooLarge,
    check_metadata,
    new_session_id,
)
from engine.state import MambaState


class SessionStore:
    persistent = False  # a release is a few assignments: the engine does it in line

    def __init__(self, max_bytes: int = 1 << 30, ttl_seconds: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES):
        self.max_bytes = max_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.ttl = ttl_seconds
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    # Queries ----------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._sessions)

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._expire_locked()
            return sum(s.nbytes for s in self._sessions.values())

    def _owned_locked(self, session_id: str, owner: str | None) -> Session:
        """The session if it exists and belongs to ``owner``: another owner sees it as missing."""
        self._expire_locked()
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(session_id)
        return session

    def get(self, session_id: str, owner: str | None) -> Session:
        with self._lock:
            return self._owned_locked(session_id, owner)

    # Mutations --------------------------------------------------------
    def _add_locked(self, owner: str | None, state: MambaState | None, pending: list[int], n_tokens: int,
                    metadata: dict) -> Session:
        session = Session(id=new_session_id(), owner=owner, state=state, pending=pending,
                          n_tokens=n_tokens, last_used=self._clock(), metadata=metadata)
        self._sessions[session.id] = session
        return session

    def create(self, owner: str | None, metadata: dict | None = None) -> Session:
        """A new empty session; :class:`SessionTooLarge` when its metadata is over the cap (nothing is created)."""
        metadata = dict(metadata or {})
        check_metadata(metadata, self.max_metadata_bytes, self.max_bytes)
        with self._lock:
            self._expire_locked()
            session = self._add_locked(owner, None, [], 0, metadata)
            self._evict_locked(keep=session.id)
            return session

    def delete(self, session_id: str, owner: str | None) -> None:
        with self._lock:
            session = self._owned_locked(session_id, owner)
            if session.busy:
                raise SessionBusy(session_id)
            del self._sessions[session_id]

    def fork(self, session_id: str, owner: str | None) -> Session:
        """A new session with a copy of the state (the parent must be idle)."""
        with self._lock:
            parent = self._owned_locked(session_id, owner)
            if parent.busy:
                raise SessionBusy(session_id)
            child = self._add_locked(owner, None if parent.state is None else parent.state.clone(),
                                     list(parent.pending), parent.n_tokens,
                                     {**parent.metadata, "forked_from": parent.id})
            self._evict_locked(keep=child.id)
            return child

    def lease(self, session_id: str, owner: str | None) -> Session:
        """Mark the session busy for one request; :class:`SessionBusy` if it already is."""
        with self._lock:
            session = self._owned_locked(session_id, owner)
            if session.busy:
                raise SessionBusy(session_id)
            session.busy = True
            self._sessions.move_to_end(session_id)
            return session

    def release(self, session: Session, state: MambaState | None = None, pending: Sequence[int] | None = None,
                n_tokens: int | None = None) -> None:
        """End a lease, storing the new state if given (the engine calls this when a request ends)."""
        with self._lock:
            if state is not None:
                session.state = state
                session.pending = list(pending or [])
                session.n_tokens = n_tokens if n_tokens is not None else session.n_tokens
            session.busy = False
            session.last_used = self._clock()
            if session.id in self._sessions:
                self._sessions.move_to_end(session.id)
                self._evict_locked(keep=session.id)

    # Bounds -----------------------------------------------------------
    def _expire_locked(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if not s.busy and now - s.last_used > self.ttl]:
            del self._sessions[sid]
            self.evictions += 1

    def _evict_locked(self, keep: str) -> None:
        """Evict idle sessions, least recently used first, until the budget holds ``keep``.

        A session that alone exceeds the budget cannot be kept: it is removed and
        :class:`SessionTooLarge` raised (a new one is then never created).
        """
        total = sum(s.nbytes for s in self._sessions.values())
        kept = self._sessions.get(keep)
        if kept is not None and kept.nbytes > self.max_bytes:
            del self._sessions[keep]
            raise SessionTooLarge(f"one session ({kept.nbytes} bytes) exceeds the store's budget of "
                                  f"{self.max_bytes} bytes")
        for sid in list(self._sessions):
            if total <= self.max_bytes:
                break
            s = self._sessions[sid]
            if sid == keep or s.busy:
                continue
            total -= s.nbytes
            del self._sessions[sid]
            self.evictions += 1

    def close(self) -> None:
        """Nothing to close: the sessions end with the process."""
