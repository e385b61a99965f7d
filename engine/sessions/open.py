"""``--session-store``: which backend a server keeps its sessions in.

``memory`` (this process only; the default), ``redis://HOST:PORT/DB`` (one
Redis shared by replicas), anything else a directory path (created if
missing; one server per directory).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.sessions.base import DEFAULT_MAX_METADATA_BYTES, SessionBackend
from engine.state import STORED_SSM_DTYPES, StateShape


def open_session_store(spec: str, *, shape: StateShape, model_id: str, device: torch.device | str | None = None,
                       max_bytes: int = 1 << 30, ttl_seconds: float = 3600.0, lease_seconds: float = 15.0,
                       max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
                       state_dtype: str = "float32") -> SessionBackend:
    """The store ``spec`` names; a directory another process holds raises
    :class:`~engine.sessions.directory.StoreLocked`, an unreachable Redis
    :class:`~engine.sessions.base.SessionStoreUnavailable`.

    ``state_dtype`` ("float32" or "bfloat16") is the precision a directory or Redis store keeps the SSM state in
    (bfloat16 halves a Mamba-2 record; it is widened back to float32 on load). The memory store keeps the states
    as they run, so it refuses any other value rather than ignore it."""
    if state_dtype not in STORED_SSM_DTYPES:
        raise ValueError(f"state dtype {state_dtype!r}: expected one of {', '.join(STORED_SSM_DTYPES)}")
    stored = None if state_dtype == "float32" else STORED_SSM_DTYPES[state_dtype]
    bounds: dict[str, Any] = dict(max_bytes=max_bytes, ttl_seconds=ttl_seconds, max_metadata_bytes=max_metadata_bytes)
    if spec == "memory":
        from engine.sessions.memory import SessionStore

        if stored is not None:
            raise ValueError(f"state dtype {state_dtype}: the memory store keeps states as they run (float32); a "
                             "lower stored precision is for a directory or Redis store")
        return SessionStore(**bounds)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from engine.sessions.redis_store import RedisSessionStore

        return RedisSessionStore(spec, shape=shape, model_id=model_id, device=device, lease_seconds=lease_seconds,
                                 state_dtype=stored, **bounds)
    if "://" in spec:
        raise ValueError(f"session store {spec!r}: expected 'memory', a directory path or redis://HOST:PORT/DB")
    from engine.sessions.directory import DirectorySessionStore

    return DirectorySessionStore(spec, shape=shape, model_id=model_id, device=device, state_dtype=stored, **bounds)
