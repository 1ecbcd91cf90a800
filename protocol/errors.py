"""Error codes, kick reasons and the protocol's exception hierarchy.

Two families of exceptions live here (STYLE practice 3):

* :class:`ProtocolError` is about *frames*. Its child :class:`FrameError`
  means the peer sent bytes that are not a well-formed frame (PROTOCOL.md §1):
  the connection answers ``bad_frame`` and closes, with WebSocket close code
  1002. Its other child :class:`LocalProtocolError` means *we* tried to do
  something invalid (encode a non-map, say): a bug, never the peer's fault.
* :class:`OpError` is about *operations*: a well-formed frame asked for
  something that fails (PROTOCOL.md §2). It carries the error code and turns
  itself into the error frame to send back; the connection stays open.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Final

__all__ = [
    "WS_CLOSE_AUTH",
    "WS_CLOSE_KICK_BASE",
    "WS_CLOSE_NORMAL",
    "WS_CLOSE_PROTOCOL",
    "WS_CLOSE_TOO_BIG",
    "ErrorCode",
    "FrameError",
    "KickReason",
    "LocalProtocolError",
    "OpError",
    "ProtocolError",
]

#: WebSocket close code for a normal close.
WS_CLOSE_NORMAL: Final = 1000
#: WebSocket close code for a protocol violation (``bad_frame``), PROTOCOL.md §2.
WS_CLOSE_PROTOCOL: Final = 1002
#: WebSocket close code for auth failure or auth timeout, PROTOCOL.md §2.
WS_CLOSE_AUTH: Final = 1008
#: WebSocket close code for a message over ``max_message_bytes``, PROTOCOL.md §2.
WS_CLOSE_TOO_BIG: Final = 1009
#: A kick closes with this plus the kick reason's number, PROTOCOL.md §2.
WS_CLOSE_KICK_BASE: Final = 4000


class ErrorCode(enum.StrEnum):
    """The ``code`` of an error frame (the table in PROTOCOL.md §2)."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_OP = "unknown_op"
    INVALID = "invalid"
    AUTH_TIMEOUT = "auth_timeout"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class KickReason(enum.StrEnum):
    """The ``reason`` of a ``kicked`` push (the kick table in PROTOCOL.md §2)."""

    REPLACED = "replaced"
    TOO_MANY_DEVICES = "too_many_devices"
    SLOW_CONSUMER = "slow_consumer"
    REVOKED = "revoked"
    SHUTDOWN = "shutdown"
    TIMEOUT = "timeout"

    @property
    def ws_close_code(self) -> int:
        """The WebSocket close code for this kick: 4000 plus the reason's number."""
        return _KICK_WS_CLOSE[self]

    def to_frame(self) -> dict[str, Any]:
        """Build the push sent before the kick closes the connection.

        Returns:
            ``{"op": "kicked", "reason": <reason>}``.
        """
        return {"op": "kicked", "reason": self.value}


_KICK_WS_CLOSE: Final[Mapping[KickReason, int]] = {
    KickReason.REPLACED: WS_CLOSE_KICK_BASE + 1,
    KickReason.TOO_MANY_DEVICES: WS_CLOSE_KICK_BASE + 2,
    KickReason.SLOW_CONSUMER: WS_CLOSE_KICK_BASE + 3,
    KickReason.REVOKED: WS_CLOSE_KICK_BASE + 4,
    KickReason.SHUTDOWN: WS_CLOSE_KICK_BASE + 5,
    KickReason.TIMEOUT: WS_CLOSE_KICK_BASE + 6,
}


class ProtocolError(Exception):
    """Base class of the frame-level errors; never raised itself."""


class FrameError(ProtocolError):
    """The peer sent something that is not a well-formed frame.

    This is always the *peer's* fault. PROTOCOL.md §1 says what to do: send
    :meth:`to_frame` (``code`` ``bad_frame``) and close the connection, with
    WebSocket close code :attr:`ws_close` (1002).

    Attributes:
        message: What was wrong, for the error frame and the log.
    """

    code: ClassVar[ErrorCode] = ErrorCode.BAD_FRAME
    close: ClassVar[bool] = True
    ws_close: ClassVar[int] = WS_CLOSE_PROTOCOL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_frame(self, rid: int | None = None) -> dict[str, Any]:
        """Build the ``bad_frame`` error frame to send before closing.

        Args:
            rid: The request id to echo, if one is known (usually not).

        Returns:
            ``{"op": "error", "code": "bad_frame", "message": ...}``.
        """
        frame: dict[str, Any] = {"op": "error"}
        if rid is not None:
            frame["rid"] = rid
        frame["code"] = self.code.value
        frame["message"] = self.message
        return frame


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug on our side.

    Raised, for example, when asked to encode something that is not a map or
    holds values MessagePack or JSON cannot carry, or when a
    :class:`~protocol.codec.FrameDecoder` is misused.
    """


class OpError(Exception):
    """An operation failed; the peer gets an error frame and stays connected.

    Args:
        code: The error code (PROTOCOL.md §2).
        message: A human-readable explanation; for ``invalid`` it reads
            ``"<field>: <what is wrong>"``.
        retry_after: Seconds until a retry may succeed (``rate_limited``).

    Attributes:
        code: As given.
        message: As given.
        retry_after: As given.
    """

    def __init__(
        self, code: ErrorCode, message: str = "", *, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}" if self.message else self.code.value

    def __repr__(self) -> str:
        extra = "" if self.retry_after is None else f", retry_after={self.retry_after!r}"
        return f"OpError({self.code.value!r}, {self.message!r}{extra})"

    def to_frame(self, rid: int | None) -> dict[str, Any]:
        """Build the error frame for this error.

        Args:
            rid: The ``rid`` of the request that failed, or ``None`` when it
                had none (then the frame has no ``rid``).

        Returns:
            ``{"op": "error", "rid": rid, "code": ..., "message": ...}``, plus
            ``"retry_after"`` when set.
        """
        frame: dict[str, Any] = {"op": "error"}
        if rid is not None:
            frame["rid"] = rid
        frame["code"] = self.code.value
        frame["message"] = self.message
        if self.retry_after is not None:
            frame["retry_after"] = self.retry_after
        return frame
