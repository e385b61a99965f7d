"""The chat prefix cache: states at message boundaries, keyed by a hash of the token prefix, and where a
request starts (its session's state, a cached prefix, or zeros)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.sessions.base import Session
from engine.state import MambaState


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
