"""What every session store shares: the session, the refusals, and the interface the engine and server use.

A session is the fixed-size state after every token it has consumed, the
tokens sampled but not yet fed (the last generated token is only fed when
the conversation continues), its token count, its owner and metadata.
Continuing it costs only the new tokens, however long the history.

A store leases a session to one request at a time (:meth:`SessionBackend.lease`,
then :meth:`SessionBackend.release` with the new state when the request
ends); a second request gets :class:`SessionBusy` instead of racing on the
state. Stores are bounded by a byte budget and an idle TTL.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.state import MambaState


class SessionNotFound(KeyError):
    pass


class SessionBusy(RuntimeError):
    pass


class SessionTooLarge(RuntimeError):
    pass


class SessionStateInvalid(RuntimeError):
    """The stored session is corrupt, of another format or written by another model: refused, never loaded."""


class SessionStoreUnavailable(RuntimeError):
    """The store cannot be reached (Redis down): the request is refused, nothing is lost."""


class SessionLeaseLost(RuntimeError):
    """The lease ended before the write-back (expired, or taken by another replica): the write was refused."""


DEFAULT_MAX_METADATA_BYTES = 16 << 10
SESSION_ID = re.compile(r"sess-[0-9a-f]{24}")


def new_session_id() -> str:
    return "sess-" + secrets.token_hex(12)


def metadata_nbytes(metadata: dict) -> int:
    """What a session's metadata costs in the budget: its size as JSON (none for no metadata)."""
    return len(json.dumps(metadata, separators=(",", ":"))) if metadata else 0


def check_metadata(metadata: dict, max_metadata_bytes: int, max_bytes: int) -> None:
    """:class:`SessionTooLarge` when a new session's metadata is over the cap (nothing is created then)."""
    size, limit = metadata_nbytes(metadata), min(max_metadata_bytes, max_bytes)
    if size > limit:
        raise SessionTooLarge(f"session metadata is {size} bytes as JSON; the limit is {limit} bytes")


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
    lease_token: str | None = None  # a shared store's fencing token while this copy is leased

    @property
    def state_nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    @property
    def nbytes(self) -> int:
        """What the session holds against the memory store's budget: its state and its metadata."""
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


class SessionBackend(Protocol):
    """The one interface of the memory, directory and Redis stores.

    ``owner`` scopes every call: another owner's session is :class:`SessionNotFound`.
    """

    persistent: bool  # True: release() writes to disk or the network, so the engine calls it off its own thread

    @property
    def evictions(self) -> int:
        """Sessions evicted for the byte budget or the TTL so far (read only: Redis counts them for every replica)."""

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def get(self, session_id: str, owner: str | None) -> Session: ...

    def create(self, owner: str | None, metadata: dict | None = None) -> Session: ...

    def delete(self, session_id: str, owner: str | None) -> None: ...

    def fork(self, session_id: str, owner: str | None) -> Session: ...

    def lease(self, session_id: str, owner: str | None) -> Session:
        """The session for one request; :class:`SessionBusy` while another request holds it."""

    def release(self, session: Session, state: MambaState | None = None, pending: Sequence[int] | None = None,
                n_tokens: int | None = None) -> None:
        """End a lease, storing the new state if given; the lease ends even when the write is refused."""

    def close(self) -> None: ...
