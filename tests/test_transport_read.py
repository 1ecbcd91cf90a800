"""transport.base.receive_some: a socket read that parks in wait_readable itself.

It must behave like ``SocketStream.receive_some`` (data, EOF, reset, close by
another task, cancellation) while keeping fewer frames suspended per idle
connection; the memory figure is measured by ``python -m bench idle``.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from imserver.transport.base import receive_some, socket_fd


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_reads_what_is_there_and_waits_for_more() -> None:
    left, right = await _pair()
    sock = socket_fd(left)
    assert sock is not None
    await right.send_all(b"hello")
    assert await receive_some(left, sock, 1024) == b"hello"
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await receive_some(left, sock, 1024))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not got  # parked: nothing to read yet
        await right.send_all(b"world")
    assert got == [b"world"]
    await left.aclose()
    await right.aclose()


async def test_eof_is_empty_bytes() -> None:
    left, right = await _pair()
    await right.aclose()
    assert await receive_some(left, socket_fd(left), 1024) == b""
    await left.aclose()


async def test_close_by_another_task_raises_closed() -> None:
    left, right = await _pair()
    sock = socket_fd(left)
    raised: list[BaseException] = []

    async def reader() -> None:
        try:
            await receive_some(left, sock, 1024)
        except trio.ClosedResourceError as e:
            raised.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await left.aclose()
    assert len(raised) == 1
    # Already closed: still ClosedResourceError, never a read of a reused fd.
    with pytest.raises(trio.ClosedResourceError):
        await receive_some(left, sock, 1024)
    await right.aclose()


async def test_reset_raises_broken() -> None:
    # A TCP reset needs TCP: a listener on loopback, abortive close (SO_LINGER 0).
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    server = trio.SocketStream(server_sock)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    with pytest.raises(trio.BrokenResourceError):
        await receive_some(server, socket_fd(server), 1024)
    await server.aclose()
    listener.close()


async def test_cancellation_point_even_when_data_is_ready() -> None:
    left, right = await _pair()
    await right.send_all(b"x")
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive_some(left, socket_fd(left), 1024)
    assert scope.cancelled_caught
    assert await receive_some(left, socket_fd(left), 1024) == b"x"  # nothing was lost
    await left.aclose()
    await right.aclose()


async def test_in_memory_stream_falls_back() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"abc")
    assert await receive_some(b, socket_fd(b), 1024) == b"abc"


async def test_tcp_transport_reads_frames_and_ends_on_eof_and_close() -> None:
    from imserver.transport.base import TransportClosed
    from imserver.transport.tcp import TcpTransport
    from protocol.codec import frame_prefix, pack

    left, right = await _pair()
    t = TcpTransport(left, max_frame_bytes=65536)
    body = pack({"op": "ping", "rid": 1})
    got: list[list[dict[str, object]]] = []

    async def reader() -> None:
        got.append(await t.receive())

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await right.send_all(frame_prefix(body) + body[:3])  # half a frame: still waiting
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        await right.send_all(body[3:] + frame_prefix(body) + body)
    assert got == [[{"op": "ping", "rid": 1}, {"op": "ping", "rid": 1}]]
    await right.aclose()
    with pytest.raises(TransportClosed):
        await t.receive()
    await left.aclose()

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
    await right.aclose()
