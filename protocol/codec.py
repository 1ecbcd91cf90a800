"""Frames to bytes and back, for TCP and WebSocket, without any I/O.

Theory of operation
-------------------

A frame is a ``dict`` with a string ``"op"`` whose values are JSON-compatible:
``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` and ``dict``
with ``str`` keys (PROTOCOL.md §1). Both encodings carry exactly that, so a
frame decoded from either can be re-encoded into either.

* TCP: :func:`encode_frame` writes a 4-byte big-endian length and one
  MessagePack map; :class:`FrameDecoder` takes bytes as they arrive
  (``receive_data``) and hands out frames (``next_frame``), h11 style.
* WebSocket: :func:`encode_ws` gives the message for one frame, binary
  (MessagePack) or text (JSON); :func:`decode_ws` turns one message into its
  frames (a binary message may hold several maps back to back).

Every decoding failure, whatever msgpack or json raised (msgpack promises no
closed set of exceptions), comes out as :class:`~protocol.errors.FrameError`:
the peer's fault, answered with ``bad_frame`` and a close. Encoding failures
are our own bugs and come out as
:class:`~protocol.errors.LocalProtocolError`.

Limits are checked before allocation (STYLE practice 4): the TCP length
prefix is checked against ``max_frame_bytes`` as soon as its 4 bytes arrive,
and msgpack's own size limits are derived from the payload's length.

What msgpack lets through that JSON cannot carry is rejected as well:
``ExtType`` and ``Timestamp`` (``max_ext_len=0`` plus an ``ext_hook`` that
raises), ``bin`` (``max_bin_len=0`` rejects all but the empty one, which the
value check below catches), non-string keys (``strict_map_key=True`` plus
the value check) and NaN or infinities.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Mapping
from typing import Any, Final, Literal, NoReturn, overload

import msgpack  # type: ignore[import-untyped]

from .errors import FrameError, LocalProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NEED_DATA",
    "Frame",
    "FrameDecoder",
    "decode_ws",
    "encode_frame",
    "encode_ws",
    "frame_prefix",
    "pack",
    "to_json",
    "unpack_map",
]

#: A decoded frame: a map with a string ``"op"`` and JSON-compatible values.
Frame = dict[str, Any]

#: Default bound on one frame's payload (one MessagePack map or JSON text), PROTOCOL.md §1.
DEFAULT_MAX_FRAME_BYTES: Final = 65536
#: Default bound on one WebSocket message, PROTOCOL.md §1.
DEFAULT_MAX_MESSAGE_BYTES: Final = 1048576

_LENGTH: Final = struct.Struct(">I")
_MAX_LENGTH: Final = 0xFFFFFFFF
# Integers that msgpack can carry; a JSON integer outside this is refused so
# that every decoded frame can be re-encoded as MessagePack.
_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**64 - 1
_MAX_ERROR_DETAIL: Final = 200


class _NeedData(enum.Enum):
    """The type of :data:`NEED_DATA`."""

    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`FrameDecoder.next_frame` when no complete frame is
#: buffered yet. Test with ``is``; mypy narrows on it.
NEED_DATA: Final = _NeedData.NEED_DATA


def _peer_error(what: str, exc: BaseException) -> FrameError:
    detail = str(exc) or type(exc).__name__
    if len(detail) > _MAX_ERROR_DETAIL:
        detail = detail[:_MAX_ERROR_DETAIL] + "..."
    return FrameError(f"{what}: {detail}")


# ---------------------------------------------------------------- encoding


def pack(frame: Mapping[str, Any]) -> bytes:
    """Encode one frame as a MessagePack map, without any length prefix.

    Args:
        frame: The frame; its values must be JSON-compatible.

    Returns:
        The MessagePack bytes (``str`` as str, ``bytes`` as bin).

    Raises:
        LocalProtocolError: ``frame`` is not a mapping or holds a value
            MessagePack cannot carry. This is a bug of the caller.
    """
    if type(frame) is not dict:
        if not isinstance(frame, Mapping):
            raise LocalProtocolError(f"a frame must be a mapping, not {type(frame).__name__}")
        frame = dict(frame)
    try:
        payload: bytes = msgpack.packb(frame, use_bin_type=True)
    except Exception as exc:  # msgpack raises TypeError, ValueError, ...
        raise LocalProtocolError(f"cannot encode frame as MessagePack: {exc}") from exc
    return payload


def frame_prefix(payload: bytes) -> bytes:
    """Build the 4-byte TCP length prefix for an already packed payload.

    Args:
        payload: One packed map, as returned by :func:`pack`.

    Returns:
        ``len(payload)`` as 4 bytes, unsigned big-endian.

    Raises:
        LocalProtocolError: The payload is empty or does not fit a 4-byte length.
    """
    size = len(payload)
    if not 0 < size <= _MAX_LENGTH:
        raise LocalProtocolError(f"cannot frame a payload of {size} bytes")
    return _LENGTH.pack(size)


def encode_frame(frame: Mapping[str, Any]) -> bytes:
    """Encode one frame for TCP: the 4-byte length prefix, then the map.

    Args:
        frame: The frame; its values must be JSON-compatible.

    Returns:
        The bytes to send.

    Raises:
        LocalProtocolError: As :func:`pack`. A bug of the caller.
    """
    payload = pack(frame)
    return frame_prefix(payload) + payload


_JSON_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def to_json(frame: Mapping[str, Any]) -> str:
    """Encode one frame as compact JSON text (no spaces, UTF-8 left as is).

    Args:
        frame: The frame; its values must be JSON-compatible.

    Returns:
        The JSON text.

    Raises:
        LocalProtocolError: A value JSON cannot carry (bytes, NaN, ...). A
            bug of the caller.
    """
    if type(frame) is not dict:
        if not isinstance(frame, Mapping):
            raise LocalProtocolError(f"a frame must be a mapping, not {type(frame).__name__}")
        frame = dict(frame)
    try:
        return _JSON_ENCODER.encode(frame)
    except Exception as exc:  # TypeError, ValueError, RecursionError, ...
        raise LocalProtocolError(f"cannot encode frame as JSON: {exc}") from exc


@overload
def encode_ws(frame: Mapping[str, Any], *, text: Literal[True]) -> str: ...
@overload
def encode_ws(frame: Mapping[str, Any], *, text: Literal[False]) -> bytes: ...
@overload
def encode_ws(frame: Mapping[str, Any], *, text: bool) -> bytes | str: ...
def encode_ws(frame: Mapping[str, Any], *, text: bool) -> bytes | str:
    """Encode one frame as one WebSocket message.

    Args:
        frame: The frame; its values must be JSON-compatible.
        text: ``True`` for a text message (compact JSON), ``False`` for a
            binary one (MessagePack). PROTOCOL.md §1: a connection answers in
            the encoding of its first frame.

    Returns:
        ``str`` for a text message, ``bytes`` for a binary one.

    Raises:
        LocalProtocolError: As :func:`pack` and :func:`to_json`. A bug of the
            caller.
    """
    return to_json(frame) if text else pack(frame)


# ---------------------------------------------------------------- decoding


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"MessagePack extension type {code} is not allowed")


_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _check_nested(root: dict[str, Any] | list[Any]) -> None:
    # Iterative, so that depth (msgpack allows ~1000 levels) cannot blow
    # the Python stack.
    stack: list[Any] = [root]
    pop = stack.pop
    push = stack.append
    scalars = _SCALARS
    while stack:
        node = pop()
        if type(node) is dict:
            for key in node:
                if type(key) is not str:
                    raise FrameError(f"map key of type {type(key).__name__} is not allowed")
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind in scalars:
                continue
            if kind is dict or kind is list:
                push(value)
            elif kind is float:
                if not math.isfinite(value):
                    raise FrameError(f"float {value!r} is not allowed")
            else:
                raise FrameError(f"value of type {kind.__name__} is not allowed")


def _check_frame(obj: Any) -> Frame:
    """Check that a decoded object is a frame with JSON-compatible values."""
    if type(obj) is not dict:
        raise FrameError(f"a frame must be a map, not {type(obj).__name__}")
    if type(obj.get("op")) is not str:
        raise FrameError("a frame must have a string 'op'")
    # Fast path: a flat map of scalars (most frames) needs one loop; anything
    # else goes through the full walk, which also checks the keys.
    scalars = _SCALARS
    for value in obj.values():
        if type(value) not in scalars:
            _check_nested(obj)
            break
    else:
        for key in obj:
            if type(key) is not str:
                raise FrameError(f"map key of type {type(key).__name__} is not allowed")
    return obj


def _unpack_one(payload: bytes | bytearray) -> Any:
    size = len(payload)
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=size,
            max_bin_len=0,
            max_array_len=size,
            max_map_len=size // 2,
            max_ext_len=0,
        )
    except Exception as exc:  # noqa: BLE001 - msgpack's exceptions are an open set
        raise _peer_error("invalid MessagePack map", exc) from None


def unpack_map(
    payload: bytes | bytearray, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Frame:
    """Decode exactly one MessagePack map holding a frame.

    Args:
        payload: The bytes of one map, without any length prefix.
        max_frame_bytes: The largest payload accepted.

    Returns:
        The frame.

    Raises:
        FrameError: The payload is empty, too long, not exactly one map
            (trailing bytes included), has no string ``"op"``, or holds a
            value that is not JSON-compatible. The peer's fault.
    """
    size = len(payload)
    if size == 0:
        raise FrameError("empty frame")
    if size > max_frame_bytes:
        raise FrameError(f"frame of {size} bytes exceeds max_frame_bytes ({max_frame_bytes})")
    return _check_frame(_unpack_one(payload))


class FrameDecoder:
    """Incremental decoder for the TCP framing (PROTOCOL.md §1).

    Feed it bytes with :meth:`receive_data` and take frames out with
    :meth:`next_frame` until it returns :data:`NEED_DATA`; then feed more.
    Draining before feeding again keeps the buffer under
    ``4 + max_frame_bytes`` plus one received chunk. A length prefix that is
    zero or over ``max_frame_bytes`` is refused as soon as its 4 bytes are
    here, before any of the payload is buffered.

    Errors are sticky: once :meth:`next_frame` raises :class:`FrameError` it
    raises again on every later call (the connection is to be closed).

    An idle decoder holds an empty buffer, however big the last frame was.

    Args:
        max_frame_bytes: The largest payload accepted (``N`` in PROTOCOL.md §1).
    """

    __slots__ = ("_buffer", "_eof", "_max_frame_bytes", "_pos")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= _MAX_LENGTH:
            raise ValueError(f"max_frame_bytes must be in 1..{_MAX_LENGTH}")
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._pos = 0  # where the unread bytes of _buffer start
        self._eof = False

    def __repr__(self) -> str:
        state = "eof" if self._eof else "open"
        return f"<FrameDecoder {state} buffered={self.buffered}>"

    @property
    def buffered(self) -> int:
        """The number of received bytes not yet returned as frames."""
        return len(self._buffer) - self._pos

    @property
    def eof(self) -> bool:
        """Whether the end of the stream has been received."""
        return self._eof

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer.

        Args:
            data: The bytes; ``b""`` means the peer closed its side (EOF).

        Raises:
            LocalProtocolError: Data after EOF, or more data while a full
                frame's worth is still buffered (call :meth:`next_frame` until
                :data:`NEED_DATA` first). A bug of the caller.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        buffer = self._buffer
        pos = self._pos
        # After draining, fewer than 4 + max_frame_bytes bytes are left (a
        # partial frame); more means next_frame() was not called.
        if len(buffer) - pos > 4 + self._max_frame_bytes:
            raise LocalProtocolError("call next_frame() until NEED_DATA before receiving more")
        if pos:
            # Compact (next_frame() does so too before NEED_DATA). Deleting
            # from the front of a bytearray is cheap in CPython.
            del buffer[:pos]
            self._pos = 0
        buffer += data

    def next_frame(self) -> Frame | _NeedData:
        """Return the next complete frame, or :data:`NEED_DATA`.

        Returns:
            The next frame, or :data:`NEED_DATA` when more bytes are needed.

        Raises:
            FrameError: A zero or too large length prefix, a payload that is
                not a frame (see :func:`unpack_map`), or a partial frame at
                EOF. The peer's fault: send ``bad_frame`` and close.
        """
        buffer = self._buffer
        pos = self._pos
        have = len(buffer)
        if have - pos >= 4:
            (size,) = _LENGTH.unpack_from(buffer, pos)
            if size == 0:
                raise FrameError("frame length is zero")
            if size > self._max_frame_bytes:
                raise FrameError(
                    f"frame length {size} exceeds max_frame_bytes ({self._max_frame_bytes})"
                )
            end = pos + 4 + size
            if end <= have:
                # Decode before consuming, so that an error stays sticky.
                frame = _check_frame(_unpack_one(buffer[pos + 4 : end]))
                if end == have:
                    # Fully drained: drop the (possibly large) buffer.
                    self._buffer = bytearray()
                    self._pos = 0
                else:
                    self._pos = end
                return frame
        if self._eof and have > pos:
            raise FrameError(f"truncated frame: {have - pos} bytes before EOF")
        if pos:
            # Keep only the partial frame; this also shrinks a big buffer
            # while the connection waits for the rest.
            del buffer[:pos]
            self._pos = 0
        return NEED_DATA

    def frames(self) -> list[Frame]:
        """Return every complete frame buffered so far, in order.

        Returns:
            The frames; empty when none is complete.

        Raises:
            FrameError: As :meth:`next_frame`, at the first bad frame (the
                good ones before it are then lost with the connection).
        """
        out: list[Frame] = []
        while True:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return out
            out.append(frame)


def _parse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int:
    # 2**64 has 20 digits; refuse long digit strings before converting.
    if len(text) > 21:
        raise ValueError("integer out of range")
    value = int(text)
    if not _MIN_INT <= value <= _MAX_INT:
        raise ValueError("integer out of range")
    return value


_JSON_DECODER: Final = json.JSONDecoder(
    parse_float=_parse_float, parse_int=_parse_int, parse_constant=_parse_constant
)
# A \uD800-\uDFFF escape may decode to a lone surrogate, which no UTF-8
# encoder (msgpack, PostgreSQL, the WebSocket) accepts.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _decode_json(message: str, max_frame_bytes: int) -> Frame:
    chars = len(message)
    if chars > max_frame_bytes:
        raise FrameError(f"text message exceeds max_frame_bytes ({max_frame_bytes})")
    if not message.isascii():
        try:
            size = len(message.encode("utf-8"))
        except UnicodeEncodeError:
            raise FrameError("text message is not valid Unicode") from None
        if size > max_frame_bytes:
            raise FrameError(
                f"text message of {size} bytes exceeds max_frame_bytes ({max_frame_bytes})"
            )
    try:
        obj = _JSON_DECODER.decode(message)
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, ValueError, RecursionError
        raise _peer_error("invalid JSON", exc) from None
    if type(obj) is not dict:
        raise FrameError(f"a frame must be a JSON object, not {type(obj).__name__}")
    if type(obj.get("op")) is not str:
        raise FrameError("a frame must have a string 'op'")
    if "\\u" in message and _SURROGATE_ESCAPE.search(message):
        try:
            _JSON_ENCODER.encode(obj).encode("utf-8")
        except Exception:  # noqa: BLE001 - UnicodeEncodeError, ...
            raise FrameError("text message holds a lone surrogate") from None
    return obj


def _decode_many(message: bytes | bytearray, max_frame_bytes: int) -> list[Frame]:
    size = len(message)
    limit = min(size, max_frame_bytes)
    unpacker = msgpack.Unpacker(
        max_buffer_size=size,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_reject_ext,
        max_str_len=limit,
        max_bin_len=0,
        max_array_len=limit,
        max_map_len=limit // 2,
        max_ext_len=0,
    )
    frames: list[Frame] = []
    start = 0
    try:
        unpacker.feed(message)
        for obj in unpacker:
            end = unpacker.tell()
            if end - start > max_frame_bytes:
                raise FrameError(
                    f"map of {end - start} bytes exceeds max_frame_bytes ({max_frame_bytes})"
                )
            start = end
            frames.append(_check_frame(obj))
    except FrameError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack's exceptions are an open set
        raise _peer_error("invalid MessagePack map", exc) from None
    if start != size:
        raise FrameError(f"truncated map: {size - start} bytes at the end of the message")
    return frames


def decode_ws(
    message: bytes | bytearray | str,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[Frame]:
    """Decode one WebSocket message into its frames (PROTOCOL.md §1).

    Args:
        message: A binary message (``bytes``: one or more MessagePack maps
            back to back) or a text message (``str``: one JSON object).
        max_frame_bytes: The largest map, or the largest text message in
            UTF-8 bytes.
        max_message_bytes: The largest binary message.

    Returns:
        The frames, in order; never empty.

    Raises:
        FrameError: Anything but well-formed frames within the limits (an
            empty message, a partial map at the end, a JSON text that is not
            one object, NaN or infinities, integers MessagePack cannot carry,
            ...). The peer's fault: send ``bad_frame`` and close with 1002.
    """
    if isinstance(message, str):
        return [_decode_json(message, max_frame_bytes)]
    size = len(message)
    if size == 0:
        raise FrameError("empty message")
    if size > max_message_bytes:
        raise FrameError(f"message of {size} bytes exceeds max_message_bytes ({max_message_bytes})")
    if size <= max_frame_bytes:
        # Fast path: most messages hold a single map.
        try:
            obj = msgpack.unpackb(
                message,
                raw=False,
                strict_map_key=True,
                use_list=True,
                ext_hook=_reject_ext,
                max_str_len=size,
                max_bin_len=0,
                max_array_len=size,
                max_map_len=size // 2,
                max_ext_len=0,
            )
        except msgpack.ExtraData:
            pass  # several maps: split them below
        except Exception as exc:  # noqa: BLE001 - msgpack's exceptions are an open set
            raise _peer_error("invalid MessagePack map", exc) from None
        else:
            return [_check_frame(obj)]
    return _decode_many(message, max_frame_bytes)
