"""The APIRouter every surface uses: a GET route answers HEAD too.

Monitors and load generators send ``HEAD /metrics`` (aiperf does); a GET route without HEAD answered 405. The
HEAD twin runs the same endpoint and dependencies (auth included), so it answers the GET's status and headers;
the HTTP server sends no body. It is left out of the OpenAPI document, which lists the GET.
"""

from __future__ import annotations

from fastapi import APIRouter


class Router(APIRouter):
    def add_api_route(self, path: str, endpoint, *, methods=None, **kwargs) -> None:
        super().add_api_route(path, endpoint, methods=methods, **kwargs)
        if methods is not None and "GET" in {m.upper() for m in methods} and "HEAD" not in methods:
            name = (kwargs.pop("name", None) or endpoint.__name__) + "_head"
            kwargs.pop("include_in_schema", None)
            super().add_api_route(path, endpoint, methods=["HEAD"], name=name, include_in_schema=False, **kwargs)
