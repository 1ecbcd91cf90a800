"""The transports' socket reads: non-blocking ``read_nowait``, then ``wait_readable``.

An idle connection's reader parks in ``trio.lowlevel.wait_readable`` in the
transport's own frame instead of inside ``SocketStream.receive_some`` (less
memory per idle connection; the figure is measured by ``python -m bench
idle``). It must behave like ``receive_some``: data, EOF, reset, close by
another task, cancellation point even when data is ready, in-memory streams.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from imserver.transport.base import TransportClosed, read_nowait, socket_fd
from imserver.transport.tcp import TcpTransport
from protocol.codec import frame_prefix, pack

PING = pack({"op": "ping", "rid": 1})


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_read_nowait_data_nothing_eof_closed() -> None:
    left, right = await _pair()
    sock = socket_fd(left)
    assert read_nowait(sock, 1024) is None  # nothing there: would block
    await right.send_all(b"hello")
    assert read_nowait(sock, 1024) == b"hello"
    await right.aclose()
    assert read_nowait(sock, 1024) == b""  # EOF
    await left.aclose()
    with pytest.raises(trio.ClosedResourceError):
        read_nowait(sock, 1024)  # never a read of a number the kernel reused


async def test_read_nowait_reset_is_broken() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    server = trio.SocketStream(server_sock)
    # Abortive close (SO_LINGER 0): the peer gets a reset.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):
        read_nowait(socket_fd(server), 1024)
    await server.aclose()
    listener.close()


async def test_tcp_reader_parks_wakes_on_data_and_ends_on_eof() -> None:
    left, right = await _pair()
    t = TcpTransport(left, max_frame_bytes=65536)
    got: list[list[dict[str, object]]] = []

    async def reader() -> None:
        got.append(await t.receive())

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await right.send_all(frame_prefix(PING) + PING[:3])  # half a frame: still waiting
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        await right.send_all(PING[3:] + frame_prefix(PING) + PING)
    assert got == [[{"op": "ping", "rid": 1}, {"op": "ping", "rid": 1}]]
    await right.aclose()
    with pytest.raises(TransportClosed):
        await t.receive()
    await left.aclose()


async def test_tcp_reader_closed_by_another_task() -> None:
    left, right = await _pair()
    t = TcpTransport(left, max_frame_bytes=65536)
    ended: list[BaseException] = []

    async def parked_reader() -> None:
        try:
            await t.receive()
        except TransportClosed as e:
            ended.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(parked_reader)
        await trio.testing.wait_all_tasks_blocked()
        await t.close()  # closed by another task while the reader is parked
    assert len(ended) == 1
    with pytest.raises(TransportClosed):
        await t.receive()  # and after: closed, not a read of a reused descriptor
    await right.aclose()


async def test_tcp_reader_is_a_cancellation_point_even_with_data_ready() -> None:
    left, right = await _pair()
    t = TcpTransport(left, max_frame_bytes=65536)
    await right.send_all(frame_prefix(PING) + PING)
    with trio.CancelScope() as scope:
        scope.cancel()
        await t.receive()
    assert scope.cancelled_caught
    assert await t.receive() == [{"op": "ping", "rid": 1}]  # nothing was lost
    await left.aclose()
    await right.aclose()


async def test_tcp_reader_over_an_in_memory_stream() -> None:
    a, b = trio.testing.memory_stream_pair()
    t = TcpTransport(b, max_frame_bytes=65536)
    await a.send_all(frame_prefix(PING) + PING)
    assert await t.receive() == [{"op": "ping", "rid": 1}]
