"""The hand-built server WebSocket frames parse as wsproto parses them (every length form)."""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from imserver.transport.base import Payload, ws_frame


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [0x1, 0x2])
def test_ws_frame_is_read_back_by_wsproto(n: int, opcode: int) -> None:
    payload = b"a" * n
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(ws_frame(opcode, payload))
    events = list(client.events())
    assert len(events) == 1
    event = events[0]
    assert event.message_finished
    if opcode == 0x1:
        assert isinstance(event, TextMessage)
        assert event.data == payload.decode()
    else:
        assert isinstance(event, BytesMessage)
        assert event.data == payload


def test_payload_frames_are_cached_and_utf8() -> None:
    p = Payload({"op": "msg", "body": "你好"})
    assert p.ws_text() is p.ws_text()
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(p.ws_text() + p.ws_binary())
    text, binary = list(client.events())
    assert text.data == p.json()
    assert binary.data == p.msgpack()
