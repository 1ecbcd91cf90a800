"""The imserver wire protocol, sans I/O: frames, codecs, schemas and error codes.

Nothing here does I/O or imports an async library (STYLE practice 1); the
server, the clients and the load tester all build on it. See
``docs/protocol.md`` for the contract this package implements.
"""

from .codec import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    NEED_DATA,
    Frame,
    FrameDecoder,
    decode_ws,
    encode_frame,
    encode_ws,
    frame_prefix,
    pack,
    to_json,
    unpack_map,
)
from .errors import (
    WS_CLOSE_AUTH,
    WS_CLOSE_KICK_BASE,
    WS_CLOSE_NORMAL,
    WS_CLOSE_PROTOCOL,
    WS_CLOSE_TOO_BIG,
    ErrorCode,
    FrameError,
    KickReason,
    LocalProtocolError,
    OpError,
    ProtocolError,
)
from .schema import CLIENT_OPS, MAX_ID, OPS, FieldSpec, FieldType, OpSchema, safe_rid, validate

__all__ = [
    "CLIENT_OPS",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_ID",
    "NEED_DATA",
    "OPS",
    "WS_CLOSE_AUTH",
    "WS_CLOSE_KICK_BASE",
    "WS_CLOSE_NORMAL",
    "WS_CLOSE_PROTOCOL",
    "WS_CLOSE_TOO_BIG",
    "ErrorCode",
    "FieldSpec",
    "FieldType",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "KickReason",
    "LocalProtocolError",
    "OpError",
    "OpSchema",
    "ProtocolError",
    "decode_ws",
    "encode_frame",
    "encode_ws",
    "frame_prefix",
    "pack",
    "safe_rid",
    "to_json",
    "unpack_map",
    "validate",
]
