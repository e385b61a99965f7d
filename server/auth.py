"""API-key auth as dependencies: who the caller is (for session ownership), and who may read metrics and docs.

A key is read from ``Authorization: Bearer <key>`` exactly: one space after the scheme, the key as configured
(``Bearer  key `` is refused, not trimmed). Keys are compared in constant time against every configured key.
Every 401 carries ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="an API key, when the server was started with --api-key")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_key(header_value: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` value, taken as sent (no trimming); None without one."""
    if header_value is None:
        return None
    scheme, _, key = header_value.partition(" ")
    return key if scheme.lower() == "bearer" and key else None


def presented_key(request: Request) -> str | None:
    return bearer_key(request.headers.get("authorization"))


def key_matches(key: str | None, keys: Iterable[str]) -> bool:
    """Whether ``key`` is one of ``keys``, compared in constant time with each of them (no early exit)."""
    if key is None:
        return False
    presented = key.encode("utf-8", "surrogateescape")
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(presented, candidate.encode("utf-8", "surrogateescape"))
    return found


def key_is_valid(header_value: str | None, keys: Iterable[str]) -> bool:
    """Whether an ``Authorization`` header value carries one of ``keys`` (pure: the transport middleware,
    :mod:`server.limits`, checks the key this way before reading the body)."""
    return key_matches(bearer_key(header_value), keys)


def refusal(what: str) -> APIError:
    """The 401 for a missing or wrong key (the routes raise it; :mod:`server.limits` answers it before the body)."""
    return APIError(401, f"missing or invalid {what} (send 'Authorization: Bearer <key>')", code="invalid_api_key",
                    headers=dict(CHALLENGE))


async def owner_of(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str | None:
    """The caller's identity (a hash of its key); None when the server has no keys; 401 without a valid key.

    (``_bearer`` documents the scheme in ``/openapi.json``; the header is read strictly by :func:`presented_key`.)
    Async, as every dependency here: FastAPI runs a plain ``def`` dependency on its thread pool, a hand-off to a
    worker thread and back for each request.
    """
    keys = request.app.state.serving.config.api_keys
    if not keys:
        return None
    key = presented_key(request)
    if key is None or not key_matches(key, keys):
        raise refusal("API key")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


Owner = Annotated[str | None, Depends(owner_of)]


async def metrics_access(request: Request) -> None:
    """``/metrics``: open, or with ``--metrics-api-key`` that key as a bearer token."""
    key = request.app.state.serving.config.metrics_api_key
    if key and not key_matches(presented_key(request), (key,)):
        raise refusal("metrics API key")


async def docs_access(request: Request) -> None:
    """``/openapi.json``, ``/docs``, ``/redoc``: open, or with API keys one of them."""
    keys = request.app.state.serving.config.api_keys
    if keys and not key_matches(presented_key(request), keys):
        raise refusal("API key")
