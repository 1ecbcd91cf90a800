"""Exceptions raised by the client library.

:class:`RequestError` (and one subclass per error code of PROTOCOL.md §2) is
an error *reply* from the server: the connection is fine, the request was
refused. The others are about the client itself: :class:`RequestTimeout`
(no reply in time), :class:`ConnectionLost` (the connection went away while
a request that cannot be retried safely was in flight) and
:class:`ClientClosed` (the client is closed or gave up: logged out, kicked
for good, token refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from protocol.errors import ErrorCode

__all__ = [
    "BadFrame",
    "ClientClosed",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "Forbidden",
    "Internal",
    "Invalid",
    "NotFound",
    "RateLimited",
    "RequestError",
    "RequestTimeout",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UnknownOp",
    "error_from_frame",
]


class ClientError(Exception):
    """Base class of every exception this library raises."""


class RequestError(ClientError):
    """The server answered a request with an error frame.

    Attributes:
        code: The error code (:class:`protocol.errors.ErrorCode`; an unknown
            code from a newer server is kept as a plain ``str``).
        message: The server's explanation.
        retry_after: Seconds to wait before retrying (``rate_limited``), else None.
        op: The operation that failed, when known.
        frame: The whole error frame.
    """

    expected_code: ClassVar[ErrorCode | None] = None

    def __init__(
        self,
        code: ErrorCode | str,
        message: str = "",
        *,
        retry_after: float | None = None,
        op: str | None = None,
        frame: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.op = op
        self.frame: dict[str, Any] = dict(frame or {})

    def __str__(self) -> str:
        code = self.code.value if isinstance(self.code, ErrorCode) else self.code
        where = f"{self.op}: " if self.op else ""
        text = f"{where}{code}"
        if self.message:
            text += f": {self.message}"
        if self.retry_after is not None:
            text += f" (retry after {self.retry_after}s)"
        return text


class BadFrame(RequestError):
    """``bad_frame``: the server could not parse what we sent (a client bug)."""

    expected_code = ErrorCode.BAD_FRAME


class UnknownOp(RequestError):
    """``unknown_op``: the server does not know the operation."""

    expected_code = ErrorCode.UNKNOWN_OP


class Invalid(RequestError):
    """``invalid``: a field is missing, of the wrong type, or out of range."""

    expected_code = ErrorCode.INVALID


class Unauthorized(RequestError):
    """``unauthorized`` (or ``auth_timeout``): bad credentials or token."""

    expected_code = ErrorCode.UNAUTHORIZED


class Forbidden(RequestError):
    """``forbidden``: not friends, blocked, not a member, window over, ..."""

    expected_code = ErrorCode.FORBIDDEN


class NotFound(RequestError):
    """``not_found``: no such user, group, conversation or message."""

    expected_code = ErrorCode.NOT_FOUND


class Conflict(RequestError):
    """``conflict``: the state forbids it (already friends, group dissolved, ...)."""

    expected_code = ErrorCode.CONFLICT


class RateLimited(RequestError):
    """``rate_limited``: see :attr:`retry_after`."""

    expected_code = ErrorCode.RATE_LIMITED


class TooLarge(RequestError):
    """``too_large``: a field over its limit."""

    expected_code = ErrorCode.TOO_LARGE


class Unavailable(RequestError):
    """``unavailable``: storage down or overloaded; nothing was accepted."""

    expected_code = ErrorCode.UNAVAILABLE


class Internal(RequestError):
    """``internal``: a server bug; nothing was accepted."""

    expected_code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[RequestError]] = {
    cls.expected_code.value: cls
    for cls in (
        BadFrame,
        UnknownOp,
        Invalid,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        RateLimited,
        TooLarge,
        Unavailable,
        Internal,
    )
    if cls.expected_code is not None
}
_BY_CODE[ErrorCode.AUTH_TIMEOUT.value] = Unauthorized


def error_from_frame(frame: Mapping[str, Any], op: str | None = None) -> RequestError:
    """Build the exception for an error frame.

    Args:
        frame: ``{"op": "error", "code": ..., "message": ..., "retry_after"?: ...}``.
        op: The operation of the request it answers, for the message.

    Returns:
        An instance of the subclass for the code (:class:`RequestError` for
        an unknown code).
    """
    raw = str(frame.get("code", "internal"))
    try:
        code: ErrorCode | str = ErrorCode(raw)
    except ValueError:
        code = raw
    retry = frame.get("retry_after")
    retry_after = float(retry) if isinstance(retry, int | float) else None
    cls = _BY_CODE.get(raw, RequestError)
    return cls(code, str(frame.get("message", "")), retry_after=retry_after, op=op, frame=frame)


class RequestTimeout(ClientError):
    """No reply within the request's timeout.

    For a ``send`` the message may or may not have been stored; sending again
    with the same ``cid`` is safe (the server deduplicates).
    """

    def __init__(self, op: str, timeout: float) -> None:
        super().__init__(f"{op}: no reply within {timeout}s")
        self.op = op
        self.timeout = timeout


class ConnectionLost(ClientError):
    """The connection dropped while a request was in flight (or before auth)."""


class ClientClosed(ClientError):
    """The client is closed, or gave up for good.

    Attributes:
        reason: Why: ``"closed"``, ``"logout"``, a kick reason that forbids
            reconnecting (``replaced``, ``revoked``, ``too_many_devices``)
            or ``"unauthorized"`` when the saved token was refused.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"client closed: {reason}")
        self.reason = reason
