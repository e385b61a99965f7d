"""The Redis session store: one Redis shared by replicas, so any replica continues any session.

Records (:mod:`engine.sessions.record`) live in Redis under their id and
expire after the idle TTL. A request's lease lives in Redis too: set if
absent, with an expiry, holding a fencing token from a counter; this process
renews the leases it holds while their requests run, so a replica that dies
mid-request frees its sessions after ``lease_seconds``. The write-back is a
script that writes only while the lease still holds the writer's token: a
replica whose lease expired or was taken can never overwrite a newer state.
One session is thus served by one request at a time across all replicas
(:class:`SessionBusy`, a 409, otherwise). Every check-and-write is one Lua
script (:mod:`engine.sessions.redis_lua`). Nothing is cached in this
process: every lease reads the record, so no replica can serve a stale state.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import torch

from engine.sessions import redis_lua
from engine.sessions.base import (
    DEFAULT_MAX_METADATA_BYTES,
    SESSION_ID,
    Session,
    SessionBusy,
    SessionLeaseLost,
    SessionNotFound,
    SessionStateInvalid,
    SessionStoreUnavailable,
    SessionTooLarge,
    check_metadata,
    new_session_id,
)
from engine.sessions.record import decode_session, encode_session, owned_by
from engine.state import MambaState, StateShape

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisSessionStore:
    persistent = True  # writes are network round trips: the engine writes behind (engine/loop/writeback.py)

    def __init__(self, url: str, *, shape: StateShape, model_id: str, device: torch.device | str | None = None,
                 max_bytes: int = 1 << 30, ttl_seconds: float = 3600.0,
                 max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES, lease_seconds: float = 15.0,
                 prefix: str = "crsm:", state_dtype: torch.dtype | None = None):
        self.url, self.prefix = url, prefix
        self.state_dtype = state_dtype  # the SSM state's precision in Redis (None: as it runs, float32)
        self.shape, self.model_id, self.device = shape, model_id, device
        self.max_bytes, self.ttl, self.max_metadata_bytes = max_bytes, ttl_seconds, max_metadata_bytes
        self.lease_seconds = lease_seconds
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        except ValueError as exc:  # redis://host:99999, redis://h:abc, a bad database number
            raise SessionStoreUnavailable(f"the session store URL {url!r} is not usable: {exc}") from None
        self._call(self._redis.ping)
        self._scripts = {name: self._redis.register_script(getattr(redis_lua, name))
                         for name in ("CREATE", "LEASE", "RENEW", "WRITE_BACK", "DELETE", "PRUNE")}
        self._held: dict[str, str] = {}  # session id -> fencing token of a lease this process holds
        self._held_lock = threading.Lock()
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="crsm-lease-renewal", daemon=True)
        self._renewer.start()

    # Plumbing -----------------------------------------------------------
    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}s:{session_id}"

    def _call(self, action: Callable[[], Awaitable[Any] | T]) -> T:
        """``action()``, its connection errors as :class:`SessionStoreUnavailable`. redis-py types every command's
        reply as ``Awaitable | Any`` (its commands serve the asyncio client too); this client is synchronous, so the
        ``Awaitable`` arm never occurs and the reply is the ``T`` part."""
        try:
            return action()  # type: ignore[return-value]  # never an Awaitable: see above
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise SessionStoreUnavailable(f"the session store at {self.url} is unreachable: {exc}") from None
        except redis.exceptions.RedisError as exc:  # out of memory, read-only replica after a failover, ...
            raise SessionStoreUnavailable(f"the session store at {self.url} refused: {exc}") from None

    def _run(self, script: str, *args) -> Any:  # the script's reply: an integer, or LEASE's [token, record]
        return self._call(lambda: self._scripts[script](keys=[], args=[self.prefix, *args]))

    def _decode(self, blob: bytes, session_id: str) -> Session:
        try:
            return decode_session(blob, self.shape, self.model_id, self.device, expect_id=session_id)
        except SessionStateInvalid as exc:
            log.warning("session %s in %s refused: %s", session_id, self.url, exc)
            raise

    def close(self) -> None:
        self._closed.set()
        self._renewer.join(timeout=5)
        self._redis.close()

    # Queries ----------------------------------------------------------
    def __len__(self) -> int:
        self._run("PRUNE", self._ttl_ms)
        return int(self._call(lambda: self._redis.zcard(self.prefix + "lru")))

    @property
    def nbytes(self) -> int:
        self._run("PRUNE", self._ttl_ms)
        return int(self._call(lambda: self._redis.get(self.prefix + "bytes")) or 0)

    @property
    def evictions(self) -> int:
        return int(self._call(lambda: self._redis.get(self.prefix + "evictions")) or 0)

    def _fetch(self, session_id: str, owner: str | None) -> Session:
        if not SESSION_ID.fullmatch(session_id):
            raise SessionNotFound(session_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._key(session_id))
        pipe.exists(f"{self.prefix}l:{session_id}")
        blob, leased = self._call(pipe.execute)
        if blob is None or not owned_by(blob, owner):
            raise SessionNotFound(session_id)
        session = self._decode(blob, session_id)
        session.busy = bool(leased)
        return session

    def get(self, session_id: str, owner: str | None) -> Session:
        return self._fetch(session_id, owner)

    # Mutations --------------------------------------------------------
    def _put_new(self, session: Session) -> Session:
        blob = encode_session(session, self.model_id, self.shape, self.state_dtype)
        if len(blob) > self.max_bytes:
            raise SessionTooLarge(f"one session ({len(blob)} bytes) exceeds the store's budget of "
                                  f"{self.max_bytes} bytes")
        self._run("CREATE", session.id, blob, self._ttl_ms, self.max_bytes)
        return session

    def create(self, owner: str | None, metadata: dict | None = None) -> Session:
        metadata = dict(metadata or {})
        check_metadata(metadata, self.max_metadata_bytes, self.max_bytes)
        return self._put_new(Session(id=new_session_id(), owner=owner, state=None, metadata=metadata))

    def delete(self, session_id: str, owner: str | None) -> None:
        if not SESSION_ID.fullmatch(session_id):
            raise SessionNotFound(session_id)
        blob = self._call(lambda: self._redis.get(self._key(session_id)))
        if blob is None or not owned_by(blob, owner):
            raise SessionNotFound(session_id)
        result = self._run("DELETE", session_id)
        if result == -1:
            raise SessionBusy(session_id)
        if result == 0:
            raise SessionNotFound(session_id)

    def fork(self, session_id: str, owner: str | None) -> Session:
        parent = self._fetch(session_id, owner)
        if parent.busy:
            raise SessionBusy(session_id)
        return self._put_new(Session(id=new_session_id(), owner=owner, state=parent.state,
                                     pending=list(parent.pending), n_tokens=parent.n_tokens,
                                     metadata={**parent.metadata, "forked_from": parent.id}))

    def lease(self, session_id: str, owner: str | None) -> Session:
        if not SESSION_ID.fullmatch(session_id):
            raise SessionNotFound(session_id)
        reply = self._run("LEASE", session_id, self._lease_ms, self._ttl_ms + self._lease_ms)
        token = int(reply[0])
        if token == 0:
            raise SessionNotFound(session_id)
        if not owned_by(reply[1], owner):
            if token > 0:  # leased a session that is not the caller's: give it straight back
                self._run("WRITE_BACK", session_id, str(token), "", self._ttl_ms, self.max_bytes)
            raise SessionNotFound(session_id)
        if token < 0:
            raise SessionBusy(session_id)
        try:
            session = self._decode(reply[1], session_id)
        except SessionStateInvalid:
            self._run("WRITE_BACK", session_id, str(token), "", self._ttl_ms, self.max_bytes)
            raise
        session.busy, session.lease_token = True, str(token)
        with self._held_lock:
            self._held[session_id] = session.lease_token
        return session

    def release(self, session: Session, state: MambaState | None = None, pending: Sequence[int] | None = None,
                n_tokens: int | None = None) -> None:
        """Write back (only while the lease holds this request's token) and end the lease.

        :class:`SessionLeaseLost` when the lease had expired or been taken: nothing was written.
        """
        token = session.lease_token
        with self._held_lock:
            if token is not None and self._held.get(session.id) == token:
                del self._held[session.id]
        session.busy, session.lease_token = False, None
        if token is None:
            return
        blob = b""
        if state is not None:
            session.state, session.pending = state, list(pending or [])
            session.n_tokens = n_tokens if n_tokens is not None else session.n_tokens
            blob = encode_session(session, self.model_id, self.shape, self.state_dtype)
        result = self._run("WRITE_BACK", session.id, token, blob, self._ttl_ms, self.max_bytes)
        if result == -1:
            raise SessionLeaseLost(f"the lease on session {session.id} was lost (expired or taken by another "
                                   f"replica) before the write-back; this request's state was not written")
        if result == -2:
            raise SessionTooLarge(f"one session ({len(blob)} bytes) exceeds the store's budget of "
                                  f"{self.max_bytes} bytes")

    # Lease renewal ------------------------------------------------------
    def _renew_loop(self) -> None:
        """Every third of the lease time, extend the leases this process holds; drop those that were lost."""
        while not self._closed.wait(self.lease_seconds / 3):
            with self._held_lock:
                held = list(self._held.items())
            for session_id, token in held:
                try:
                    renewed = self._run("RENEW", session_id, token, self._lease_ms, self._ttl_ms + self._lease_ms)
                except Exception:  # Redis away for a moment: the next round tries again
                    log.warning("could not renew the lease on session %s", session_id, exc_info=True)
                    continue
                if not renewed:
                    log.warning("lease on session %s lost; its request's state will not be written back", session_id)
                    with self._held_lock:
                        if self._held.get(session_id) == token:
                            del self._held[session_id]
