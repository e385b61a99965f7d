"""Session store: cached recurrent states that conversations continue from.

A session is the fixed-size state after every token it has consumed, the
tokens sampled but not yet fed (the last generated token is only fed when
the conversation continues), its token count and its owner. Continuing it
costs only the new tokens, however long the history.

The store is bounded by a byte budget (states and metadata; a session's
metadata also has a cap of its own) and a TTL, evicts the least recently
used idle session first, and leases a session to one request at a time: a
second request gets :class:`SessionBusy` instead of racing on the state.
Thread-safe: the HTTP layer leases, the engine thread writes back.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.state import MambaState


class SessionNotFound(KeyError):
    pass


class SessionBusy(RuntimeError):
    pass


class SessionTooLarge(RuntimeError):
    pass


DEFAULT_MAX_METADATA_BYTES = 16 << 10


def metadata_nbytes(metadata: dict) -> int:
    """What a session's metadata costs in the budget: its size as JSON (none for no metadata)."""
    return len(json.dumps(metadata, separators=(",", ":"))) if metadata else 0


@dataclass
class Session:
    id: str
    owner: str | None
    state: MambaState | None  # None: nothing consumed yet
    pending: list[int] = field(default_factory=list)  # sampled, not yet fed
    n_tokens: int = 0  # tokens consumed into ``state`` plus pending
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    metadata: dict = field(default_factory=dict)

    @property
    def state_nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    @property
    def nbytes(self) -> int:
        """What the session holds against the store's budget: its state and its metadata."""
        return self.state_nbytes + metadata_nbytes(self.metadata)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "object": "session",
            "created": int(self.created),
            "tokens": self.n_tokens,
            "state_bytes": self.state_nbytes,
            "busy": self.busy,
            "metadata": self.metadata,
        }


class SessionStore:
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
        session = Session(id="sess-" + secrets.token_hex(12), owner=owner, state=state, pending=pending,
                          n_tokens=n_tokens, last_used=self._clock(), metadata=metadata)
        self._sessions[session.id] = session
        return session

    def create(self, owner: str | None, metadata: dict | None = None) -> Session:
        """A new empty session; :class:`SessionTooLarge` when its metadata is over the cap (nothing is created)."""
        metadata = dict(metadata or {})
        size = metadata_nbytes(metadata)
        if size > min(self.max_metadata_bytes, self.max_bytes):
            raise SessionTooLarge(f"session metadata is {size} bytes as JSON; the limit is "
                                  f"{min(self.max_metadata_bytes, self.max_bytes)} bytes")
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


def prefix_key(token_ids: Sequence[int]) -> str:
    """A stable hash of a token prefix (the key of the automatic prefix cache)."""
    h = hashlib.sha256()
    h.update(len(token_ids).to_bytes(8, "little"))
    for t in token_ids:
        h.update(int(t).to_bytes(4, "little", signed=True))
    return h.hexdigest()


@dataclass
class PrefixEntry:
    state: MambaState
    pending: list[int]
    n_tokens: int


class PrefixCache:
    """States at chat message boundaries, keyed by a hash of the token prefix.

    A request that repeats an earlier conversation plus a new message finds the
    state at the longest cached boundary and prefills only the rest. Bounded by
    bytes, LRU. Entries are never mutated: a hit hands out a clone.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, token_ids: Sequence[int], state: MambaState, pending: Sequence[int] = ()) -> None:
        """Remember ``state`` (+ ``pending`` tokens) as the result of consuming ``token_ids``."""
        if state.nbytes > self.max_bytes:
            return
        key = prefix_key(token_ids)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.state.nbytes
            self._entries[key] = PrefixEntry(state.clone(), list(pending), len(token_ids))
            self._bytes += state.nbytes
            while self._bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.state.nbytes

    def longest(self, token_ids: Sequence[int], boundaries: Sequence[int]) -> PrefixEntry | None:
        """The entry for the longest ``token_ids[:b]`` cached, b in ``boundaries``; a private copy."""
        with self._lock:
            self.queries += 1
            for b in sorted(set(boundaries), reverse=True):
                if not 0 < b <= len(token_ids):
                    continue
                entry = self._entries.get(prefix_key(token_ids[:b]))
                if entry is not None:
                    self._entries.move_to_end(prefix_key(token_ids[:b]))
                    self.hits += 1
                    return PrefixEntry(entry.state.clone(), list(entry.pending), entry.n_tokens)
            return None


def start_state(prompt_ids: Sequence[int], prefix_boundaries: Sequence[int], session: Session | None,
                prefix_cache: PrefixCache) -> tuple[MambaState | None, int, list[int]]:
    """Where a request starts: (state, tokens already in it, tokens to prefill).

    A session continues from its own state (a copy: the stored one stays
    intact until the request ends); a chat request without a session from the
    longest cached prefix of its prompt; anything else from zeros (None).
    """
    if session is not None:
        start = session.state.clone() if session.state is not None else None
        return start, session.n_tokens - len(session.pending), list(session.pending) + list(prompt_ids)
    if prefix_boundaries:
        # A state is only useful with tokens left to feed: the next logits come from feeding them.
        usable = [b for b in prefix_boundaries if b < len(prompt_ids)]
        entry = prefix_cache.longest(prompt_ids, usable)
        if entry is not None:
            return entry.state, entry.n_tokens - len(entry.pending), entry.pending + list(prompt_ids[entry.n_tokens :])
    return None, 0, list(prompt_ids)
