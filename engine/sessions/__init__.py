"""Sessions: the recurrent states conversations continue from, in one of three stores, and the prefix cache.

- :mod:`engine.sessions.base`: the session, the refusals, the store interface (:class:`SessionBackend`);
- :mod:`engine.sessions.memory`: :class:`SessionStore`, in this process (the default);
- :mod:`engine.sessions.directory`: one file per session, written atomically (survives restarts);
- :mod:`engine.sessions.redis_store`: one Redis shared by replicas, leases with fencing tokens;
- :mod:`engine.sessions.record`: a session as checked bytes (format, model identity, checksum);
- :mod:`engine.sessions.identity`: the model identity stored states carry;
- :mod:`engine.sessions.open`: ``--session-store`` to a store;
- :mod:`engine.sessions.prefix_cache`: the chat prefix cache and a request's start state.
"""

from engine.sessions.base import (
    DEFAULT_MAX_METADATA_BYTES,
    Session,
    SessionBackend,
    SessionBusy,
    SessionLeaseLost,
    SessionNotFound,
    SessionStateInvalid,
    SessionStoreUnavailable,
    SessionTooLarge,
    metadata_nbytes,
)
from engine.sessions.memory import SessionStore
from engine.sessions.open import open_session_store
from engine.sessions.prefix_cache import PrefixCache, PrefixEntry, prefix_key, start_state

__all__ = [
    "DEFAULT_MAX_METADATA_BYTES", "PrefixCache", "PrefixEntry", "Session", "SessionBackend", "SessionBusy",
    "SessionLeaseLost", "SessionNotFound", "SessionStateInvalid", "SessionStore", "SessionStoreUnavailable",
    "SessionTooLarge", "metadata_nbytes", "open_session_store", "prefix_key", "start_state",
]
