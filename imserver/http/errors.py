"""One mapping from the protocol's error codes to HTTP, and the JSON error body.

Every route answers errors as ``{"error": {"code": CODE, "message": TEXT}}``
with the status that fits the code (PROTOCOL §9), ``Retry-After`` with
``rate_limited``. Exceptions are mapped here once, at the layer boundary
(STYLE: httpcore's ``map_exceptions``): services raise
:class:`~protocol.errors.OpError`, storage raises ``StorageError``, FastAPI
raises its validation and HTTP exceptions.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from protocol.errors import ErrorCode, OpError

from ..storage.errors import StorageError, StorageUnavailable

if TYPE_CHECKING:
    from ..state import ServerState

log = logging.getLogger("imserver.http")

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.INVALID: 400,
    ErrorCode.UNKNOWN_OP: 404,
    ErrorCode.AUTH_TIMEOUT: 401,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}

#: HTTP statuses raised by the framework itself, as protocol codes.
_CODE_OF_STATUS = {
    400: ErrorCode.INVALID,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


def error_response(
    code: ErrorCode, message: str, *, status: int | None = None, retry_after: float | None = None
) -> JSONResponse:
    """The JSON error answer for ``code``."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(
        {"error": {"code": code.value, "message": message}},
        status_code=status or STATUS[code],
        headers=headers,
    )


def _field_name(loc: Any) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI, state: ServerState) -> None:
    """Register the exception handlers that turn every failure into the JSON error body."""
    stats = state.stats

    async def op_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpError)
        stats.error(exc.code.value)
        return error_response(exc.code, exc.message, retry_after=exc.retry_after)

    async def storage_error(request: Request, exc: Exception) -> JSONResponse:
        stats.error("unavailable")
        if not isinstance(exc, StorageUnavailable):
            log.warning("http_storage_error path=%s error=%s", request.url.path, exc)
        return error_response(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        stats.error("invalid")
        errors = exc.errors()
        if errors:
            first = errors[0]
            if first.get("type") == "json_invalid":
                message = "body: not valid JSON"
            else:
                message = f"{_field_name(first.get('loc', ()))}: {first.get('msg', 'invalid')}"
        else:
            message = "invalid request"
        return error_response(ErrorCode.INVALID, message)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = _CODE_OF_STATUS.get(exc.status_code, ErrorCode.INVALID)
        stats.error(code.value)
        return error_response(code, str(exc.detail), status=exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        stats.error("internal")
        log.exception("http_internal_error path=%s", request.url.path)
        return error_response(ErrorCode.INTERNAL, "internal server error")

    app.add_exception_handler(OpError, op_error)
    app.add_exception_handler(StorageError, storage_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
