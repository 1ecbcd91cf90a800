"""The session state machine without sockets or a database (STYLE practice 2, level b).

A ``Session`` runs over ``trio.testing.memory_stream_pair`` with a real
``ServerState`` whose storage is never opened: in the CONNECTED state no
operation but auth/login/register may reach the services, so any other first
frame must be answered ``unauthorized`` and closed, whatever it is.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from imserver.app import _build_state
from imserver.session import AUTH_OPS, Session
from imserver.storage.db import Storage
from imserver.transport.tcp import TcpTransport
from protocol import schema
from protocol.codec import NEED_DATA, FrameDecoder, encode_frame

from .conftest import test_config


async def _run_first_frame(data: bytes) -> tuple[list[dict], bool]:
    state = _build_state(test_config(), Storage("postgresql://unused"))
    client, server = trio.testing.memory_stream_pair()
    session = Session(TcpTransport(server, max_frame_bytes=65536, peer="mem"), state)
    frames: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.run)
        await client.send_all(data)
        decoder = FrameDecoder()
        with trio.fail_after(10):
            while True:
                chunk = await client.receive_some()
                decoder.receive_data(chunk)
                while (f := decoder.next_frame()) is not NEED_DATA:
                    frames.append(f)  # type: ignore[arg-type]
                if not chunk:
                    break
    return frames, not state.sessions


@pytest.mark.parametrize("op", [*sorted(schema.CLIENT_OPS - AUTH_OPS), "nonsense", "ok"])
async def test_any_other_first_frame_is_unauthorized_and_closed(
    op: str, autojump_clock: trio.testing.MockClock
) -> None:
    frames, gone = await _run_first_frame(encode_frame({"op": op, "rid": 7}))
    assert frames == [
        {"op": "error", "rid": 7, "code": "unauthorized", "message": "authenticate first"}
    ]
    assert gone


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00\x00", b"\x00\x01\x00\x01" + b"x" * 10, b"\x00\x00\x00\x01\x90"],
    ids=["zero-length", "over-limit", "array"],
)
async def test_bad_first_frame_is_bad_frame_and_closed(
    data: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    frames, gone = await _run_first_frame(data)
    assert [f["code"] for f in frames] == ["bad_frame"]
    assert gone


async def test_silence_is_auth_timeout(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    frames, gone = await _run_first_frame(b"")
    assert [f["code"] for f in frames] == ["auth_timeout"]
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
    assert gone
