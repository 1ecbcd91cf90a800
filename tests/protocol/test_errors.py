"""Tests for protocol.errors, checked against the tables of the protocol document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import (
    WS_CLOSE_AUTH,
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

_HERE = Path(__file__).resolve()
_DOC = _HERE.parents[2] / "docs" / "protocol.md"
if not _DOC.exists():
    _DOC = _HERE.parents[3] / "shared" / "PROTOCOL.md"


def section(number: int) -> str:
    text = _DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## {number}\. .*?(?=^## \d+\. |\Z)", text, re.M | re.S)
    assert match, f"section {number} not found in {_DOC}"
    return match.group(0)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.replace(" ", "").startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


def test_error_codes_match_the_protocol_table() -> None:
    rows = table_rows(section(2), "|code|meaning|")
    assert [row[0] for row in rows] == [code.value for code in ErrorCode]


def test_kick_reasons_match_the_protocol_table() -> None:
    rows = table_rows(section(2), "|reason|closecode|")
    assert [(row[0], int(row[1])) for row in rows] == [
        (reason.value, reason.ws_close_code) for reason in KickReason
    ]


def test_close_codes() -> None:
    assert (WS_CLOSE_NORMAL, WS_CLOSE_PROTOCOL, WS_CLOSE_AUTH, WS_CLOSE_TOO_BIG) == (
        1000,
        1002,
        1008,
        1009,
    )
    assert [reason.ws_close_code for reason in KickReason] == list(range(4001, 4007))
    assert KickReason.SLOW_CONSUMER.to_frame() == {"op": "kicked", "reason": "slow_consumer"}


def test_hierarchy() -> None:
    assert issubclass(FrameError, ProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(OpError, ProtocolError)
    error = FrameError("frame length is zero")
    assert (error.code, error.close, error.ws_close) == (ErrorCode.BAD_FRAME, True, 1002)
    assert error.message == str(error) == "frame length is zero"
    assert error.to_frame() == {"op": "error", "code": "bad_frame", "message": str(error)}
    assert error.to_frame(3)["rid"] == 3


def test_op_error_frame() -> None:
    error = OpError(ErrorCode.NOT_FOUND, "no such user")
    assert error.to_frame(4) == {
        "op": "error",
        "rid": 4,
        "code": "not_found",
        "message": "no such user",
    }
    assert error.to_frame(None) == {"op": "error", "code": "not_found", "message": "no such user"}
    assert str(error) == "not_found: no such user"
    assert "not_found" in repr(error)


def test_op_error_retry_after() -> None:
    error = OpError(ErrorCode.RATE_LIMITED, "slow down", retry_after=0.5)
    assert error.to_frame(1) == {
        "op": "error",
        "rid": 1,
        "code": "rate_limited",
        "message": "slow down",
        "retry_after": 0.5,
    }
    assert "retry_after=0.5" in repr(error)
    bare = OpError(ErrorCode.INTERNAL)
    assert bare.message == ""
    assert str(bare) == "internal"
    assert type(bare.to_frame(None)["code"]) is str


def test_op_error_can_be_raised_and_caught() -> None:
    with pytest.raises(OpError) as info:
        raise OpError(ErrorCode.FORBIDDEN, "not friends")
    assert info.value.code is ErrorCode.FORBIDDEN
