"""Explicit stateful sessions: ``/v1/sessions`` create, get, delete, fork, on whichever store the server uses.

A stored session that is corrupt or was written by another model answers 409
(``session_state_invalid``, saying why) and is never loaded; it can still be
deleted. An unreachable store answers 503.
"""

from __future__ import annotations

from engine.sessions import SessionStoreUnavailable, SessionTooLarge
from server.auth import Owner
from server.errors import APIError, error_responses
from server.responses import SessionDeleted, SessionInfo
from server.routes.router import Router
from server.schemas import SessionCreateRequest
from server.serving import ServingDep, session_or_404

router = Router(prefix="/v1/sessions", tags=["sessions"])
SESSION_ERRORS = error_responses(401, 404, 409, 413, 503)


@router.post("", response_model=SessionInfo, responses=error_responses(400, 401, 413, 503))
async def create_session(owner: Owner, srv: ServingDep, body: SessionCreateRequest | None = None):
    """A new, empty session; continue it by sending ``session_id`` with a completion."""
    try:
        return srv.engine.sessions.create(owner, metadata=(body.metadata if body else {})).describe()
    except SessionTooLarge as exc:  # nothing was created
        raise APIError(413, str(exc), param="metadata") from None
    except SessionStoreUnavailable as exc:
        raise APIError(503, str(exc), code="session_store_unavailable", headers={"Retry-After": "1"}) from None


@router.get("/{session_id}", response_model=SessionInfo, responses=SESSION_ERRORS)
async def get_session(session_id: str, owner: Owner, srv: ServingDep):
    return session_or_404(lambda: srv.engine.sessions.get(session_id, owner), session_id).describe()


@router.delete("/{session_id}", response_model=SessionDeleted, responses=SESSION_ERRORS)
async def delete_session(session_id: str, owner: Owner, srv: ServingDep):
    session_or_404(lambda: srv.engine.sessions.delete(session_id, owner), session_id)
    return SessionDeleted(id=session_id, deleted=True)


@router.post("/{session_id}/fork", response_model=SessionInfo, responses=SESSION_ERRORS)
async def fork_session(session_id: str, owner: Owner, srv: ServingDep):
    """A copy of the session's state and history, continued independently."""
    return session_or_404(lambda: srv.engine.sessions.fork(session_id, owner), session_id).describe()
