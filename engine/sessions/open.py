"""``--session-store``: which backend a server keeps its sessions in.

``memory`` (this process only; the default), ``redis://HOST:PORT/DB`` (one
Redis shared by replicas), anything else a directory path (created if
missing; one server per directory).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.sessions.base import DEFAULT_MAX_METADATA_BYTES, SessionBackend
from engine.state import StateShape


def open_session_store(spec: str, *, shape: StateShape, model_id: str, device: torch.device | str | None = None,
                       max_bytes: int = 1 << 30, ttl_seconds: float = 3600.0, lease_seconds: float = 15.0,
                       max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES) -> SessionBackend:
    """The store ``spec`` names; a directory another process holds raises
    :class:`~engine.sessions.directory.StoreLocked`, an unreachable Redis
    :class:`~engine.sessions.base.SessionStoreUnavailable`."""
    bounds: dict[str, Any] = dict(max_bytes=max_bytes, ttl_seconds=ttl_seconds, max_metadata_bytes=max_metadata_bytes)
    if spec == "memory":
        from engine.sessions.memory import SessionStore

        return SessionStore(**bounds)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from engine.sessions.redis_store import RedisSessionStore

        return RedisSessionStore(spec, shape=shape, model_id=model_id, device=device, lease_seconds=lease_seconds,
                                 **bounds)
    if "://" in spec:
        raise ValueError(f"session store {spec!r}: expected 'memory', a directory path or redis://HOST:PORT/DB")
    from engine.sessions.directory import DirectorySessionStore

    return DirectorySessionStore(spec, shape=shape, model_id=model_id, device=device, **bounds)
