"""OpenAI-style error bodies: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.responses import ErrorBody
from server.schemas import is_union_tag

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to send back: unpaired surrogates (which JSON bodies can carry) escaped, cut to ``limit``."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": printable(message), "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else printable(param), "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _field_path(loc: tuple) -> str:
    """An error's location as the ``param`` a client reads (``messages.0.content``): no ``body`` prefix, no
    branch labels of shaped unions, keys the client sent shortened and escaped."""
    parts = loc[1:] if loc[:1] == ("body",) else loc
    return ".".join(printable(str(p), 64) for p in parts if not is_union_tag(p))


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if errors[0].get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = _field_path(tuple(errors[0].get("loc", ()))) or None
    if errors[0].get("type") == "extra_forbidden":  # a field the body does not declare: never ignored
        return (f"{param}: not supported by this server (a field it does not implement is refused, not ignored; "
                f"see docs/api.md#fields)"), param
    messages = "; ".join(f"{_field_path(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return messages, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        errors = exc.errors()
        code = "unsupported_parameter" if errors and errors[0].get("type") == "extra_forbidden" else "invalid_value"
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses=`` of a route: the error body under each status it can answer."""
    return {status: {"model": ErrorBody, "description": f"{HTTPStatus(status).phrase} ({ERROR_TYPES[status]})"}
            for status in statuses}
