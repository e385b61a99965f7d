"""``/openapi.json``, ``/docs`` (Swagger UI), ``/redoc``: FastAPI's own pages, behind the API keys when set.

A browser cannot send a bearer token on navigation, so with API keys the pages are for clients that can
(``curl -H 'Authorization: Bearer ...' /openapi.json``); without keys they are open as before.
"""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse

from server.auth import docs_access
from server.routes.router import Router

router = Router(include_in_schema=False, dependencies=[Depends(docs_access)])
OPENAPI_URL = "/openapi.json"


def _openapi_url(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + OPENAPI_URL


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=_openapi_url(request), title=request.app.title + " - Swagger UI",
                               oauth2_redirect_url="/docs/oauth2-redirect")


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_openapi_url(request), title=request.app.title + " - ReDoc")
