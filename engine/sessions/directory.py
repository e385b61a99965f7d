"""The directory session store: one file per session, so conversations survive restarts and crashes.

Each session is one record (:mod:`engine.sessions.record`) in
``<root>/<id>.session``, written whole when a request ends: a temporary file
in the same directory, fsynced, renamed over the old one, and the directory
fsynced, so a crash at any point leaves either the old record or the new one.
Nothing is read at start-up but the directory listing (sizes and mtimes):
records are read, and checked, when a session is used.

The byte budget counts the records' sizes on disk; the TTL runs from a
session's last use (its file's mtime, so it carries across restarts). Leases
live in this process: one process per directory, enforced with an exclusive
``flock`` on ``<root>/.lock`` (released by the kernel however the process
ends), so two servers never share a directory by mistake.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.sessions.base import (
    DEFAULT_MAX_METADATA_BYTES,
    SESSION_ID,
    Session,
    SessionBusy,
    SessionNotFound,
    SessionStateInvalid,
    SessionTooLarge,
    check_metadata,
    new_session_id,
)
from engine.sessions.record import decode_session, encode_session, owned_by
from engine.state import MambaState, StateShape

log = logging.getLogger(__name__)
SUFFIX = ".session"
TMP_PREFIX = ".tmp-"


class StoreLocked(RuntimeError):
    """Another process already serves from this session directory."""


def _lock_directory(root: Path) -> int:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLocked(f"session directory {root} is in use by another process (pid {holder}); "
                          f"one server per directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySessionStore:
    persistent = True  # writes are fsynced files: the engine writes behind (engine/loop/writeback.py)

    def __init__(self, root: str | Path, *, shape: StateShape, model_id: str, device: torch.device | str | None = None,
                 max_bytes: int = 1 << 30, ttl_seconds: float = 3600.0,
                 max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES, clock: Callable[[], float] = time.time,
                 state_dtype: torch.dtype | None = None):
        self.root = Path(root)
        self.state_dtype = state_dtype  # the SSM state's precision on disk (None: as it runs, float32)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shape, self.model_id, self.device = shape, model_id, device
        self.max_bytes, self.ttl, self.max_metadata_bytes = max_bytes, ttl_seconds, max_metadata_bytes
        self._clock = clock
        self._lock_fd: int | None = _lock_directory(self.root)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # id -> record bytes, least recently used first
        self._last_used: dict[str, float] = {}  # id -> wall-clock time of last use (the file's mtime)
        self._leased: dict[str, Session] = {}
        self._bytes = 0
        self.evictions = 0
        self._scan()

    # Start-up ---------------------------------------------------------
    def _scan(self) -> None:
        """Index the records by size and mtime (nothing is read); remove temporary files a crash left behind."""
        found = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(TMP_PREFIX):
                    os.unlink(entry.path)
                elif entry.name.endswith(SUFFIX) and SESSION_ID.fullmatch(entry.name[: -len(SUFFIX)]):
                    st = entry.stat()
                    found.append((st.st_mtime, entry.name[: -len(SUFFIX)], st.st_size))
        for mtime, sid, size in sorted(found):
            self._sizes[sid], self._last_used[sid] = size, mtime
            self._bytes += size
        with self._lock:
            self._expire_locked()
            self._evict_locked(keep=None)
        log.info("session directory %s: %d sessions, %d bytes", self.root, len(self._sizes), self._bytes)

    def close(self) -> None:
        """Give the directory up (the lock goes with it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # Files --------------------------------------------------------------
    def _path(self, session_id: str) -> Path:
        return self.root / (session_id + SUFFIX)

    def _read_locked(self, session_id: str, owner: str | None) -> Session:
        """The session from its file (another owner's is missing); :class:`SessionStateInvalid` if refused."""
        self._expire_locked()
        if not SESSION_ID.fullmatch(session_id) or session_id not in self._sizes:
            raise SessionNotFound(session_id)
        try:
            blob = self._path(session_id).read_bytes()
        except FileNotFoundError:
            self._forget_locked(session_id)
            raise SessionNotFound(session_id) from None
        if not owned_by(blob, owner):
            raise SessionNotFound(session_id)
        try:
            session = decode_session(blob, self.shape, self.model_id, self.device, expect_id=session_id)
        except SessionStateInvalid as exc:
            log.warning("session %s in %s refused: %s", session_id, self.root, exc)
            raise
        session.busy = session_id in self._leased
        return session

    def _write_file(self, session: Session) -> int:
        """Write the record atomically (temporary file, fsync, rename, directory fsync); its size.

        Called without the store's lock: only the holder of a session (its
        creator, or the request leasing it) writes its file, and a reader sees
        the old record or the new one, never a part.
        """
        blob = encode_session(session, self.model_id, self.shape, self.state_dtype)
        tmp = self.root / f"{TMP_PREFIX}{session.id}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(session.id))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return len(blob)

    def _index_locked(self, session_id: str, size: int) -> None:
        """Count a record just written, as used now."""
        self._bytes += size - self._sizes.get(session_id, 0)
        self._sizes[session_id] = size
        self._sizes.move_to_end(session_id)
        self._last_used[session_id] = self._clock()

    def _touch_locked(self, session_id: str) -> None:
        if session_id in self._sizes:
            now = self._clock()
            self._last_used[session_id] = now
            self._sizes.move_to_end(session_id)
            try:
                os.utime(self._path(session_id), (now, now))
            except FileNotFoundError:
                self._forget_locked(session_id)

    def _remove_locked(self, session_id: str) -> None:
        self._path(session_id).unlink(missing_ok=True)
        self._forget_locked(session_id)

    def _forget_locked(self, session_id: str) -> None:
        self._bytes -= self._sizes.pop(session_id, 0)
        self._last_used.pop(session_id, None)

    # Queries ----------------------------------------------------------
    def __len__(self) -> int:
        with self._lock:
            self._expire_locked()
            return len(self._sizes)

    @property
    def nbytes(self) -> int:
        with self._lock:
            self._expire_locked()
            return self._bytes

    def get(self, session_id: str, owner: str | None) -> Session:
        with self._lock:
            return self._read_locked(session_id, owner)

    # Mutations --------------------------------------------------------
    def create(self, owner: str | None, metadata: dict | None = None) -> Session:
        metadata = dict(metadata or {})
        check_metadata(metadata, self.max_metadata_bytes, self.max_bytes)
        session = Session(id=new_session_id(), owner=owner, state=None, metadata=metadata)
        size = self._write_file(session)
        with self._lock:
            self._expire_locked()
            self._index_locked(session.id, size)
            self._evict_locked(keep=session.id)
        return session

    def delete(self, session_id: str, owner: str | None) -> None:
        with self._lock:
            if not SESSION_ID.fullmatch(session_id) or session_id not in self._sizes:
                raise SessionNotFound(session_id)
            try:
                blob = self._path(session_id).read_bytes()
            except FileNotFoundError:
                blob = b""
            if not blob or not owned_by(blob, owner):  # a damaged record may be deleted by whoever names it
                raise SessionNotFound(session_id)
            if session_id in self._leased:
                raise SessionBusy(session_id)
            self._remove_locked(session_id)

    def fork(self, session_id: str, owner: str | None) -> Session:
        with self._lock:
            parent = self._read_locked(session_id, owner)
            if parent.busy:
                raise SessionBusy(session_id)
            child = Session(id=new_session_id(), owner=owner, state=parent.state, pending=list(parent.pending),
                            n_tokens=parent.n_tokens, metadata={**parent.metadata, "forked_from": parent.id})
            self._touch_locked(session_id)
        size = self._write_file(child)
        with self._lock:
            self._index_locked(child.id, size)
            self._evict_locked(keep=child.id)
        return child

    def lease(self, session_id: str, owner: str | None) -> Session:
        with self._lock:
            held = self._leased.get(session_id)
            if held is not None:
                if held.owner != owner:
                    raise SessionNotFound(session_id)
                raise SessionBusy(session_id)
            session = self._read_locked(session_id, owner)
            session.busy = True
            self._leased[session_id] = session
            self._touch_locked(session_id)
            return session

    def release(self, session: Session, state: MambaState | None = None, pending: Sequence[int] | None = None,
                n_tokens: int | None = None) -> None:
        """End the lease; with ``state``, write the session back first (the lease ends even if that fails).

        The file is written outside the store's lock, so the event loop's
        lookups do not wait on this fsync.
        """
        try:
            if state is not None and session.id in self._leased:
                session.state, session.pending = state, list(pending or [])
                session.n_tokens = n_tokens if n_tokens is not None else session.n_tokens
                size = self._write_file(session)
                with self._lock:
                    self._index_locked(session.id, size)
                    self._evict_locked(keep=session.id)
            else:
                with self._lock:
                    self._touch_locked(session.id)
        finally:
            with self._lock:
                if self._leased.get(session.id) is session:
                    del self._leased[session.id]
                session.busy = False

    # Bounds -----------------------------------------------------------
    def _expire_locked(self) -> None:
        """Remove idle sessions unused for longer than the TTL (least recently used first, so stop at a fresh one)."""
        now = self._clock()
        for sid in list(self._sizes):
            if now - self._last_used[sid] <= self.ttl:
                break
            if sid not in self._leased:
                self._remove_locked(sid)
                self.evictions += 1

    def _evict_locked(self, keep: str | None) -> None:
        """Remove idle sessions, least recently used first, until the budget holds ``keep``.

        A session that alone exceeds the budget is removed and :class:`SessionTooLarge` raised.
        """
        if keep is not None and self._sizes.get(keep, 0) > self.max_bytes:
            size = self._sizes[keep]
            self._remove_locked(keep)
            raise SessionTooLarge(f"one session ({size} bytes on disk) exceeds the store's budget of "
                                  f"{self.max_bytes} bytes")
        for sid in list(self._sizes):
            if self._bytes <= self.max_bytes:
                break
            if sid != keep and sid not in self._leased:
                self._remove_locked(sid)
                self.evictions += 1
