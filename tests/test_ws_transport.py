"""Tests for :mod:`imserver.transport.websocket` over real loopback sockets.

Each test starts ``trio.serve_tcp`` on port 0 with a small handler built on
:class:`WebSocketTransport` (by default an echo: receive frames, send them
back) and talks to it with trio-websocket, or, for what trio-websocket cannot
send (fragments, pipelined or bad frames, huge handshakes), with a wsproto
client over a raw trio stream. Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from imserver.transport.base import Payload, TransportClosed
from imserver.transport.websocket import CLOSE_TIMEOUT, WebSocketTransport
from protocol.errors import FrameError

TIMEOUT = 10


def pack(frame: dict[str, Any]) -> bytes:
    """MessagePack one frame, as a client would."""
    return msgpack.packb(frame)  # type: ignore[no-any-return]


def close_code(exc: ConnectionClosed) -> int:
    """The close code trio-websocket reports."""
    assert exc.reason is not None
    return exc.reason.code


def unpack_all(message: bytes) -> list[Any]:
    """All maps packed back to back in one binary message."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(message)
    return list(unpacker)


class CountingStream(trio.abc.Stream):
    """Wraps a stream and counts ``send_all`` calls and bytes received."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.send_all_calls = 0
        self.received = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.send_all_calls += 1
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_eof(self) -> None:  # pragma: no cover - not used by the transport
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.stream.aclose()


Session = Callable[[WebSocketTransport, "Server"], Awaitable[None]]


@dataclass
class Server:
    """What the test server saw."""

    port: int = 0
    outcomes: list[BaseException | str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    transports: list[WebSocketTransport] = field(default_factory=list)
    streams: list[CountingStream] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


async def echo(transport: WebSocketTransport, server: Server) -> None:
    """Send every received frame back; record how receive ended."""
    try:
        while True:
            frames = await transport.receive()
            server.batches.append(len(frames))
            await transport.send([Payload(f) for f in frames])
    except FrameError as e:
        server.outcomes.append(e)
        await transport.close(e.ws_close)
    except TransportClosed as e:
        server.outcomes.append(e)
        await transport.close()


@asynccontextmanager
async def ws_server(session: Session = echo, **accept_kwargs: Any) -> AsyncIterator[Server]:
    """Serve WebSockets on a loopback port for the duration of the block."""
    server = Server()

    async def handler(raw: trio.SocketStream) -> None:
        stream = CountingStream(raw)
        server.streams.append(stream)
        try:
            transport = await WebSocketTransport.accept(stream, peer="test", **accept_kwargs)
            if transport is None:
                server.outcomes.append("refused")
                return
            server.transports.append(transport)
            await session(transport, server)
        finally:
            server.done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def ws_client(url: str) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url``, plus closing its socket after a server-side close.

    trio-websocket 0.12's client never closes its TCP stream when the server
    initiates the close: its reader stops at EOF once the handshake is over
    and ``aclose()`` returns early because a close reason is already set. The
    socket would then be collected unclosed (a ``ResourceWarning``, an error
    here).
    """
    async with open_websocket_url(url) as ws:
        try:
            yield ws
        finally:
            await ws._stream.aclose()


# -- a raw wsproto client, for what trio-websocket does not send -------------


async def raw_connect(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """Open a WebSocket with a bare wsproto client."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws")))
    while True:
        ws.receive_data(await stream.receive_some(65536))
        for event in ws.events():
            assert isinstance(event, AcceptConnection)
            return stream, ws


async def raw_events(stream: trio.abc.Stream, ws: WSConnection) -> list[Event]:
    """Read until wsproto gives at least one event (a close event on EOF)."""
    while True:
        try:
            data: bytes | None = bytes(await stream.receive_some(65536)) or None
        except trio.BrokenResourceError:
            data = None
        ws.receive_data(data)
        events = list(ws.events())
        if events:
            return events


async def raw_messages(stream: trio.abc.Stream, ws: WSConnection, count: int) -> list[Any]:
    """Read ``count`` whole messages (bytes or str), reassembling fragments."""
    messages: list[Any] = []
    parts: list[Any] = []
    while len(messages) < count:
        for event in await raw_events(stream, ws):
            if isinstance(event, AcceptConnection):
                continue  # the handshake's answer, when read together with a message
            assert isinstance(event, (BytesMessage, TextMessage)), event
            parts.append(event.data)
            if event.message_finished:
                messages.append("".join(parts) if isinstance(parts[0], str) else b"".join(parts))
                parts = []
    return messages


async def raw_close_code(stream: trio.abc.Stream, ws: WSConnection) -> int:
    """Skip to the server's close frame and return its code."""
    while True:
        for event in await raw_events(stream, ws):
            if isinstance(event, CloseConnection):
                return event.code


async def abort(stream: trio.SocketStream) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the server's next I/O fails."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def http_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        response = b""
        while data := await stream.receive_some(65536):
            response += data
        return response


# -- encodings ------------------------------------------------------------------


async def test_msgpack_echo() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            async with ws_client(server.url) as ws:
                await ws.send_message(pack({"op": "ping", "rid": 1}))
                reply = await ws.get_message()
                assert isinstance(reply, bytes)
                assert msgpack.unpackb(reply) == {"op": "ping", "rid": 1}
                assert server.transports[0].text is False
            await server.done.wait()
            assert server.batches == [1]


async def test_several_maps_in_one_binary_message() -> None:
    frames: list[dict[str, Any]] = [
        {"op": "a", "rid": 1},
        {"op": "b", "x": [1, 2.5, None]},
        {"op": "c", "s": "é"},
    ]
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server, ws_client(server.url) as ws:
            await ws.send_message(b"".join(pack(f) for f in frames))
            reply = await ws.get_message()
            assert isinstance(reply, bytes)
            # Three frames in, one receive() and one send(); they come back packed together.
            assert unpack_all(reply) == frames
            assert server.batches == [3]


async def test_json_text_echo() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server, ws_client(server.url) as ws:
            await ws.send_message('{"op":"ping","rid":2,"note":"héllo ✓"}')
            reply = await ws.get_message()
            assert isinstance(reply, str)
            assert json.loads(reply) == {"op": "ping", "rid": 2, "note": "héllo ✓"}
            assert server.transports[0].text is True


async def test_mixed_text_then_binary_closes_1002() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server, ws_client(server.url) as ws:
            await ws.send_message('{"op":"ping"}')
            assert json.loads(await ws.get_message()) == {"op": "ping"}
            await ws.send_message(pack({"op": "ping"}))
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert close_code(info.value) == 1002
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, FrameError)
            assert "mixed text and binary" in str(outcome)


# -- limits -------------------------------------------------------------------


@pytest.mark.parametrize("text", [False, True])
async def test_message_over_max_message_bytes_closes_1009(text: bool) -> None:
    big: str | bytes = json.dumps({"op": "x", "pad": "é" * 3000})  # 6000+ UTF-8 bytes
    if not text:
        big = pack({"op": "x", "pad": "a" * 6000})
    with trio.fail_after(TIMEOUT):
        async with ws_server(max_message_bytes=4096) as server:
            async with ws_client(server.url) as ws:
                await ws.send_message(big)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert close_code(info.value) == 1009
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            assert "max_message_bytes" in str(outcome)


async def test_map_over_max_frame_bytes_raises_frame_error() -> None:
    message = pack({"op": "ok"}) + pack({"op": "x", "pad": "a" * 2000})
    with trio.fail_after(TIMEOUT):
        async with ws_server(max_frame_bytes=1024) as server:
            async with ws_client(server.url) as ws:
                await ws.send_message(message)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert close_code(info.value) == 1002
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, FrameError)


async def test_oversized_frame_fails_early() -> None:
    """A frame declaring 64 MiB is refused after little more than the limit is read."""
    limit = 65536
    with trio.fail_after(TIMEOUT):
        async with ws_server(max_message_bytes=limit) as server:
            stream, ws = await raw_connect(server.port)
            # One binary frame header for 64 MiB with a zero masking key, so the
            # payload is plain zeros, sent piece by piece.
            header = b"\x82\xff" + (64 << 20).to_bytes(8, "big") + b"\0\0\0\0"

            async def flood() -> None:
                try:
                    await stream.send_all(header)
                    for _ in range(1024):
                        await stream.send_all(bytes(65536))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                code = await raw_close_code(stream, ws)
                nursery.cancel_scope.cancel()
            await stream.aclose()
            await server.done.wait()
            assert code in (1009, 1006)  # 1006: a reset overtook the close frame
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            # The limit plus one read, then the drain's budget (2 * limit + one
            # read) plus one read: far from the 64 MiB announced.
            assert server.streams[0].received <= 3 * limit + 3 * 65536


async def test_handshake_over_max_handshake_bytes_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server(max_handshake_bytes=4096) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)

            async def flood() -> None:
                try:
                    await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: ")
                    for _ in range(64):
                        await stream.send_all(b"a" * 16384)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            response = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                try:
                    while data := await stream.receive_some(65536):
                        response += data
                except trio.BrokenResourceError:
                    pass  # a reset may overtake the 400
                nursery.cancel_scope.cancel()
            await stream.aclose()
            await server.done.wait()
            assert server.outcomes == ["refused"]
            assert response == b"" or response.startswith(b"HTTP/1.1 400 ")
            # h11 refuses once its buffer passes 4096 bytes: at most one read of
            # 4097 bytes after that; not the megabyte.
            assert server.streams[0].received <= 4096 + 4097


# -- handshake ----------------------------------------------------------------


async def test_wrong_path_is_404() -> None:
    # trio-websocket's client, on a stream we own: open_websocket_url() leaves
    # its socket unclosed when the handshake is refused (trio-websocket 0.12).
    rejected: list[ConnectionRejected] = []
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                try:
                    async with trio.open_nursery() as nursery:
                        await wrap_client_stream(nursery, stream, "127.0.0.1", "/nope")
                except* ConnectionRejected as group:
                    rejected.extend(group.exceptions)  # type: ignore[arg-type]
            assert [e.status_code for e in rejected] == [404]
            await server.done.wait()
            assert server.outcomes == ["refused"]


_UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (b"hello there\r\n\r\n", b"400"),
        (
            b"POST /ws HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"Sec-WebSocket-Version: 13\r\n\r\n",
            b"400",
        ),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"\r\n", b"400"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"Sec-WebSocket-Version: 8\r\n\r\n",
            b"426",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"400",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: AAAAAAAAAAA=\r\nSec-WebSocket-Version: 13\r\n\r\n",
            b"400",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\n" + _UPGRADE + b"Sec-WebSocket-Version: 13\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            b"400",
        ),
    ],
    ids=[
        "no-upgrade",
        "wrong-path",
        "not-http",
        "post",
        "no-version",
        "old-version",
        "bad-key",
        "short-key",
        "body",
    ],
)
async def test_bad_requests_are_refused(request_bytes: bytes, status: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            response = await http_exchange(server.port, request_bytes)
            assert response.startswith(b"HTTP/1.1 " + status + b" ")
            assert b"Upgrade: websocket" not in response
            if status == b"426":
                assert b"Sec-WebSocket-Version: 13\r\n" in response
            await server.done.wait()
            assert server.outcomes == ["refused"]


@pytest.mark.parametrize("reset", [False, True])
async def test_peer_leaving_mid_handshake_gets_no_answer(reset: bool) -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            await trio.testing.wait_all_tasks_blocked()
            if reset:
                await abort(stream)
            else:
                await stream.aclose()
            await server.done.wait()
            assert server.outcomes == ["refused"]


async def test_accept_answers_rfc_example_and_query_string_is_ignored() -> None:
    request = (
        b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(request)
            response = b""
            while b"\r\n\r\n" not in response:
                response += await stream.receive_some(65536)
            assert response.startswith(b"HTTP/1.1 101 ")
            # The accept token of RFC 6455 §1.3's example; no extension is agreed.
            assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
            assert b"Extensions" not in response
            await stream.aclose()
            await server.done.wait()
            assert isinstance(server.outcomes[0], TransportClosed)


async def test_frame_pipelined_with_the_handshake_is_not_lost() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            ws = WSConnection(ConnectionType.CLIENT)
            request = ws.send(Request(host="127.0.0.1", target="/ws"))
            frame = Connection(ConnectionType.CLIENT).send(Message(data=pack({"op": "early"})))
            await stream.send_all(request + frame)  # one write: the frame sits behind the request
            [reply] = await raw_messages(stream, ws, 1)
            assert msgpack.unpackb(reply) == {"op": "early"}
            await stream.aclose()


# -- control frames and closing -------------------------------------------------


async def test_ping_is_answered() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server, ws_client(server.url) as ws:
            await ws.ping(b"one")  # returns once the pong is in
            await ws.send_message(pack({"op": "x"}))
            assert msgpack.unpackb(await ws.get_message()) == {"op": "x"}
            await ws.ping(b"two")


async def test_pings_while_the_writer_is_busy() -> None:
    """Pongs from the reader and data from the writer never interleave badly."""
    batches, per_batch = 40, 100
    pad = "x" * 1000

    async def session(transport: WebSocketTransport, server: Server) -> None:
        async def writer() -> None:
            for b in range(batches):
                await transport.send(
                    [Payload({"op": "push", "b": b, "i": i, "pad": pad}) for i in range(per_batch)]
                )

        async def reader() -> None:
            try:
                while True:
                    await transport.receive()  # answers the pings
            except TransportClosed as e:
                server.outcomes.append(e)

        await transport.receive()  # the client's go
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await reader()

    with trio.fail_after(TIMEOUT):
        async with ws_server(session) as server, ws_client(server.url) as ws:
            received: list[Any] = []

            async def consume() -> None:
                while len(received) < batches * per_batch:
                    message = await ws.get_message()
                    assert isinstance(message, bytes)
                    received.extend(unpack_all(message))

            await ws.send_message(pack({"op": "go"}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                for n in range(30):
                    await ws.ping(b"%d" % n)
            assert [(f["b"], f["i"]) for f in received] == [
                (b, i) for b in range(batches) for i in range(per_batch)
            ]


async def test_client_close_ends_receive_and_is_echoed() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            async with ws_client(server.url) as ws:
                await ws.send_message(pack({"op": "x"}))
                await ws.get_message()
                await ws.aclose(code=4321, reason="bye")
                assert ws.closed is not None
                assert ws.closed.code == 4321  # the server echoed our code
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            assert "4321" in str(outcome)


async def test_bad_websocket_framing_closes_1002() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream, ws = await raw_connect(server.port)
            # Server-to-client frames are unmasked, which a server must refuse (RFC 6455 §5.1).
            await stream.send_all(Connection(ConnectionType.SERVER).send(Message(data=b"\x80")))
            assert await raw_close_code(stream, ws) == 1002
            await stream.aclose()
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            assert "framing" in str(outcome)


@pytest.mark.parametrize(("code", "seen"), [(None, 1005), (999, 1011), (1000, 1000)])
async def test_close_codes(code: int | None, seen: int) -> None:
    async def session(transport: WebSocketTransport, server: Server) -> None:
        await transport.close(code)

    with trio.fail_after(TIMEOUT):
        async with ws_server(session) as server, ws_client(server.url) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert close_code(info.value) == seen
            await server.done.wait()


async def test_reset_by_peer_ends_receive() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream, ws = await raw_connect(server.port)
            await stream.send_all(ws.send(Message(data=pack({"op": "x"}))))
            assert len(await raw_messages(stream, ws, 1)) == 1
            assert "msgpack open" in repr(server.transports[0])
            await abort(stream)
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            assert "closed" in repr(server.transports[0])


@pytest.mark.parametrize("reader_active", [False, True])
async def test_server_close_sends_code_and_completes_the_handshake(reader_active: bool) -> None:
    """close(4001) reaches the client; the reply is awaited by the reader or by close()."""
    elapsed: list[float] = []

    async def session(transport: WebSocketTransport, server: Server) -> None:
        await transport.send([Payload(f) for f in await transport.receive()])
        async with trio.open_nursery() as nursery:
            if reader_active:

                async def reader() -> None:
                    with pytest.raises(TransportClosed):
                        await transport.receive()

                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await transport.close(4001, "replaced")
            elapsed.append(trio.current_time() - start)
            await transport.close(1000)  # idempotent
        with pytest.raises(TransportClosed):
            await transport.receive()
        with pytest.raises(TransportClosed):
            await transport.send([Payload({"op": "late"})])

    with trio.fail_after(TIMEOUT):
        async with ws_server(session) as server, ws_client(server.url) as ws:
            await ws.send_message(pack({"op": "x"}))
            await ws.get_message()
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert close_code(info.value) == 4001
            assert info.value.reason is not None
            assert info.value.reason.reason == "replaced"
            await server.done.wait()
            # The client's close reply ended the wait, not CLOSE_TIMEOUT.
            assert elapsed[0] < 0.5


# -- fragmentation ----------------------------------------------------------------


async def test_fragmented_messages_are_reassembled() -> None:
    frames: list[dict[str, Any]] = [{"op": "a", "rid": 7}, {"op": "b", "body": "x" * 300}]
    blob = b"".join(pack(f) for f in frames)
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream, ws = await raw_connect(server.port)
            # Three fragments with a ping between them, written in two pieces.
            first = ws.send(Message(data=blob[:3], message_finished=False))
            first += ws.send(Ping(payload=b"mid"))
            first += ws.send(Message(data=blob[3:100], message_finished=False))
            await stream.send_all(first)
            events = await raw_events(stream, ws)
            assert events == [Pong(payload=b"mid")]
            await stream.send_all(ws.send(Message(data=blob[100:], message_finished=True)))
            [reply] = await raw_messages(stream, ws, 1)
            assert unpack_all(reply) == frames
            assert server.batches == [2]
            await stream.aclose()


async def test_fragmented_text_is_reassembled() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server() as server:
            stream, ws = await raw_connect(server.port)
            data = ws.send(Message(data='{"op":"h', message_finished=False))
            data += ws.send(Message(data="é✓", message_finished=False))
            data += ws.send(Message(data='"}', message_finished=True))
            await stream.send_all(data)
            [reply] = await raw_messages(stream, ws, 1)
            assert json.loads(reply) == {"op": "hé✓"}
            assert server.transports[0].text is True
            await stream.aclose()


async def test_oversized_fragment_stream_closes_1009() -> None:
    with trio.fail_after(TIMEOUT):
        async with ws_server(max_message_bytes=4096) as server:
            stream, ws = await raw_connect(server.port)
            for _ in range(10):  # 10 x 1000 bytes, each fragment small
                await stream.send_all(ws.send(Message(data=bytes(1000), message_finished=False)))
            assert await raw_close_code(stream, ws) == 1009
            await stream.send_all(ws.send(CloseConnection(code=1009)))
            await stream.aclose()
            await server.done.wait()
            [outcome] = server.outcomes
            assert isinstance(outcome, TransportClosed)
            assert server.transports[0]._parts is None  # the partial message was released


# -- sending ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "max_message_bytes"), [(False, 1048576), (False, 2048), (True, 1048576)]
)
async def test_send_of_1000_payloads_is_one_send_all(text: bool, max_message_bytes: int) -> None:
    count = 1000
    calls: list[int] = []

    async def session(transport: WebSocketTransport, server: Server) -> None:
        await transport.receive()
        stream = server.streams[0]
        before = stream.send_all_calls
        await transport.send([Payload({"op": "msg", "i": i}) for i in range(count)])
        calls.append(stream.send_all_calls - before)
        with pytest.raises(TransportClosed):
            await transport.receive()

    with trio.fail_after(TIMEOUT):
        async with (
            ws_server(session, max_message_bytes=max_message_bytes) as server,
            ws_client(server.url) as ws,
        ):
            await ws.send_message('{"op":"go"}' if text else pack({"op": "go"}))
            received: list[Any] = []
            messages = 0
            while len(received) < count:
                message = await ws.get_message()
                messages += 1
                if text:
                    assert isinstance(message, str)
                    received.append(json.loads(message))
                else:
                    assert isinstance(message, bytes)
                    assert len(message) <= max_message_bytes
                    received.extend(unpack_all(message))
            assert received == [{"op": "msg", "i": i} for i in range(count)]
            assert calls == [1]
            if text:
                assert messages == count  # one JSON object per text message
            elif max_message_bytes == 2048:
                assert messages > 1  # split at max_message_bytes
            else:
                assert messages == 1


async def test_send_before_the_encoding_is_known_uses_msgpack() -> None:
    async def session(transport: WebSocketTransport, server: Server) -> None:
        assert transport.text is None
        await transport.send([Payload({"op": "error", "code": "auth_timeout"})])
        await transport.close(1008)

    with trio.fail_after(TIMEOUT):
        async with ws_server(session) as server, ws_client(server.url) as ws:
            assert msgpack.unpackb(await ws.get_message()) == {
                "op": "error",
                "code": "auth_timeout",
            }
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert close_code(info.value) == 1008


# -- over memory streams: exact interleavings --------------------------------------


@asynccontextmanager
async def memory_websocket(
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.lockstep_stream_pair,
) -> AsyncIterator[tuple[WebSocketTransport, trio.abc.Stream, WSConnection, trio.Nursery]]:
    """A transport on one end of an in-memory stream, a wsproto client on the other.

    With the default lockstep pair, ``send_all`` returns only once the other
    side has read everything, so a writer stays blocked while the client
    reads nothing.
    """
    server_stream, client_stream = pair()
    ws = WSConnection(ConnectionType.CLIENT)
    accepted: list[WebSocketTransport | None] = []

    async def accept() -> None:
        accepted.append(await WebSocketTransport.accept(server_stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        await client_stream.send_all(ws.send(Request(host="x", target="/ws")))
        assert isinstance((await raw_events(client_stream, ws))[0], AcceptConnection)
    [transport] = accepted
    assert transport is not None
    async with trio.open_nursery() as nursery:
        try:
            yield transport, client_stream, ws, nursery
        finally:
            nursery.cancel_scope.cancel()


async def read_until(stream: trio.abc.Stream, ws: WSConnection, count: int) -> list[Event]:
    """Read until ``count`` events arrived."""
    events: list[Event] = []
    while len(events) < count:
        events += await raw_events(stream, ws)
    return events


async def test_pong_waits_for_a_blocked_writer_then_follows_its_data() -> None:
    with trio.fail_after(TIMEOUT):
        async with memory_websocket() as (transport, client, ws, nursery):
            nursery.start_soon(transport.send, [Payload({"op": "push"})])
            await trio.testing.wait_all_tasks_blocked()  # the writer holds the lock, blocked
            nursery.start_soon(transport.receive)
            await client.send_all(ws.send(Ping(payload=b"p")))
            await trio.testing.wait_all_tasks_blocked()  # the Pong is queued, not written
            events = await read_until(client, ws, 2)
            assert events == [BytesMessage(data=pack({"op": "push"})), Pong(payload=b"p")]


async def test_writer_waits_for_a_pong_being_written() -> None:
    with trio.fail_after(TIMEOUT):
        async with memory_websocket() as (transport, client, ws, nursery):
            nursery.start_soon(transport.receive)
            await client.send_all(ws.send(Ping(payload=b"p")))
            await trio.testing.wait_all_tasks_blocked()  # the reader is writing the Pong
            nursery.start_soon(transport.send, [Payload({"op": "push"})])
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for the lock
            events = await read_until(client, ws, 2)
            assert events == [Pong(payload=b"p"), BytesMessage(data=pack({"op": "push"}))]


async def test_pong_for_a_ping_read_with_data_goes_out_with_the_next_send() -> None:
    with trio.fail_after(TIMEOUT):
        async with memory_websocket(trio.testing.memory_stream_pair) as (transport, client, ws, _):
            await client.send_all(
                ws.send(Ping(payload=b"p")) + ws.send(Message(data=pack({"op": "x"})))
            )
            frames = await transport.receive()  # returns at once, without writing
            await transport.send([Payload(f) for f in frames])  # the Pong rides along
            events = await read_until(client, ws, 2)
            assert events == [Pong(payload=b"p"), BytesMessage(data=pack({"op": "x"}))]


@pytest.mark.parametrize("then", ["close", "receive"])
async def test_frames_before_a_close_frame_are_delivered_first(then: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with memory_websocket(trio.testing.memory_stream_pair) as (transport, client, ws, _):
            await client.send_all(
                ws.send(Message(data=pack({"op": "last"})))
                + ws.send(CloseConnection(code=4100, reason="done"))
            )
            assert await transport.receive() == [{"op": "last"}]
            with pytest.raises(TransportClosed, match="closing"):
                await transport.send([Payload({"op": "late"})])
            if then == "close":
                await transport.close()  # without a code: echoes the client's
            else:
                with pytest.raises(TransportClosed, match="4100"):
                    await transport.receive()  # the close frame kept for later
            [event] = await raw_events(client, ws)
            assert event == CloseConnection(code=4100, reason="done")
            with pytest.raises(TransportClosed):
                await transport.receive()


async def test_peer_gone_before_the_pong_or_the_close_frame() -> None:
    with trio.fail_after(TIMEOUT):
        async with memory_websocket(trio.testing.memory_stream_pair) as (transport, client, ws, _):
            await client.send_all(
                ws.send(Ping(payload=b"p")) + ws.send(Message(data=pack({"op": "x"})))
            )
            await transport.receive()  # the Pong stays queued
            await client.aclose()
            with pytest.raises(TransportClosed):
                await transport.receive()  # writing the Pong fails
        async with memory_websocket(trio.testing.memory_stream_pair) as (transport, client, ws, _):
            await transport.send([])  # nothing to do
            await client.aclose()
            await transport.close(1000)  # writing the close frame fails: no error


async def test_close_is_bounded_when_the_peer_reads_nothing(autojump_clock: Any) -> None:
    outcome: list[BaseException] = []

    async def writer(transport: WebSocketTransport) -> None:
        try:
            await transport.send([Payload({"op": "push"})])
        except TransportClosed as e:
            outcome.append(e)

    with trio.fail_after(TIMEOUT):
        async with memory_websocket() as (transport, _, _, nursery):
            nursery.start_soon(writer, transport)
            await trio.testing.wait_all_tasks_blocked()  # blocked: the client never reads
            start = trio.current_time()
            await transport.close(4003)
            assert trio.current_time() - start == pytest.approx(CLOSE_TIMEOUT)
            await trio.testing.wait_all_tasks_blocked()
            assert len(outcome) == 1
