"""API-key auth as a dependency: who the caller is, for session ownership."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server was started with --api-key")


def key_is_valid(header_value: str | None, keys: Collection[str]) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <key>`` with one of ``keys``.

    Parsed as HTTPBearer parses it (scheme case-insensitive, key stripped); every key is compared in constant time.
    Pure, so the transport middleware (:mod:`server.limits`) can check a key before reading the body.
    """
    scheme, _, key = (header_value or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


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
