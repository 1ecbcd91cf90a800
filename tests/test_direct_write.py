"""The direct-write fast path (``Transport.send_nowait``) keeps bytes whole and in order.

A push to an idle connection is written by the publishing task itself when the
kernel takes it without blocking. These tests force partial writes (tiny
socket buffers on a socketpair, a reader that has not started) and check that
the rest goes out first, before any later frame, Pong or close frame.
"""

from __future__ import annotations

import socket
import struct

import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping

from imserver.transport.base import FLUSH, Payload
from imserver.transport.tcp import TcpTransport
from imserver.transport.websocket import WebSocketTransport
from protocol.codec import NEED_DATA, FrameDecoder

BIG = "x" * 200_000


def _pair() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    a, b = trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return trio.SocketStream(a), b


async def _read_all(sock: trio.socket.SocketType, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await sock.recv(65536)
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


async def test_tcp_partial_direct_write_then_queue() -> None:
    stream, peer = _pair()
    t = TcpTransport(stream, max_frame_bytes=1 << 20)
    first = Payload({"op": "msg", "body": BIG})
    second = Payload({"op": "msg", "body": "after"})
    assert t.send_nowait(first) is False  # the kernel took only part of it
    assert t.send_nowait(second) is None  # not before the rest is out
    want = len(first.tcp()) + len(second.tcp())
    async with trio.open_nursery() as nursery:
        got: list[bytes] = []

        async def reader() -> None:
            got.append(await _read_all(peer, want))

        nursery.start_soon(reader)
        await t.send([FLUSH, second])
    decoder = FrameDecoder(1 << 20)
    decoder.receive_data(got[0])
    frames = []
    while (f := decoder.next_frame()) is not NEED_DATA:
        frames.append(f)
    assert [f["body"] for f in frames] == [BIG, "after"]
    # Idle again: a small push goes straight out.
    assert t.send_nowait(Payload({"op": "msg", "body": "direct"})) is True
    await t.close()
    assert t.send_nowait(Payload({"op": "x"})) is None  # closed: never written
    peer.close()


def _ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into (opcode, payload)."""
    out = []
    i = 0
    while i < len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[i : i + 2])
            i += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[i : i + 8])
            i += 8
        out.append((op, data[i : i + n]))
        i += n
    return out


async def test_ws_partial_direct_write_keeps_pong_and_close_outside_the_frame() -> None:
    stream, peer = _pair()
    conn = Connection(ConnectionType.SERVER)
    t = WebSocketTransport(stream, conn, max_frame_bytes=1 << 20, max_message_bytes=1 << 21)
    first = Payload({"op": "msg", "body": BIG})
    assert t.send_nowait(first) is False
    # The client pings meanwhile: the Pong must wait for the rest of the frame.
    t._control = conn.send(Ping(b"hi").response())
    assert t.send_nowait(Payload({"op": "later"})) is None
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            data = b""
            while True:
                chunk = await peer.recv(65536)
                if not chunk:
                    break
                data += chunk
            got.append(data)

        nursery.start_soon(reader)
        await t._flush_control()
        await t.send([FLUSH])
        with trio.move_on_after(2):
            await t.close(1000)
    frames = _ws_frames(got[0])
    assert [op for op, _ in frames] == [0x2, 0xA, 0x8]  # binary, pong, close
    assert frames[0][1] == first.msgpack() and frames[1][1] == b"hi"
    peer.close()


async def test_send_many_nowait_writes_frames_in_order() -> None:
    payloads = [Payload({"op": "msg", "seq": i, "body": "y" * 100}) for i in range(5)]
    stream, peer = _pair()
    t = TcpTransport(stream, max_frame_bytes=1 << 20)
    assert t.send_many_nowait(payloads) is True
    decoder = FrameDecoder(1 << 20)
    decoder.receive_data(await _read_all(peer, sum(len(p.tcp()) for p in payloads)))
    frames = []
    while (f := decoder.next_frame()) is not NEED_DATA:
        frames.append(f)
    assert [f["seq"] for f in frames] == [0, 1, 2, 3, 4]
    peer.close()
    await t.close()

    stream, peer = _pair()
    w = WebSocketTransport(
        stream, Connection(ConnectionType.SERVER), max_frame_bytes=1 << 20, max_message_bytes=300
    )
    assert w.send_many_nowait(payloads) is True
    data = b""
    while len(data) < 5 * 100:
        data += await peer.recv(65536)
    with trio.move_on_after(0.2):
        while chunk := await peer.recv(65536):
            data += chunk
    messages = _ws_frames(data)
    # MessagePack maps packed back to back, at most max_message_bytes a message.
    assert all(op == 0x2 for op, _ in messages) and 1 < len(messages) < 5
    assert b"".join(m for _, m in messages) == b"".join(p.msgpack() for p in payloads)
    peer.close()
    await stream.aclose()
