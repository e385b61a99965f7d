"""API-key auth as a dependency: who the caller is, for session ownership."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server was started with --api-key")


def owner_of(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
             ) -> str | None:
    """The caller's identity (a hash of its key); None when the server has no keys; 401 without a valid key."""
    keys = request.app.state.serving.config.api_keys
    if not keys:
        return None
    if credentials is None or credentials.credentials not in keys:
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
    return hashlib.sha256(credentials.credentials.encode()).hexdigest()[:16]


Owner = Annotated[str | None, Depends(owner_of)]
