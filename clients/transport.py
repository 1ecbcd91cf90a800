"""One connection's worth of framing over TCP or WebSocket (PROTOCOL.md §1).

A :class:`Transport` sends one frame at a time and receives frames in
order; it knows nothing of requests or sessions. Failures of the connection
come out as :class:`TransportClosed`.
"""

from __future__ import annotations

import collections
from typing import Any, Literal, Protocol

import trio
import trio_websocket

from protocol.codec import NEED_DATA, FrameDecoder, decode_ws, encode_frame, encode_ws
from protocol.errors import FrameError

__all__ = [
    "Encoding",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "TransportKind",
    "WsTransport",
    "open_transport",
]

TransportKind = Literal["tcp", "ws"]
Encoding = Literal["msgpack", "json"]

#: Bound on frames we accept from the server (a history page of 200 long
#: messages exceeds the server's own 64 KiB request bound).
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class TransportClosed(Exception):
    """The connection is gone.

    Attributes:
        code: The WebSocket close code, when there was one.
        reason: The WebSocket close reason or a description.
    """

    def __init__(self, reason: str = "", code: int | None = None) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if code else reason or "closed")
        self.code = code
        self.reason = reason


class Transport(Protocol):
    """What the client needs from a connection."""

    async def send(self, frame: dict[str, Any]) -> None:
        """Write one frame (callers serialize writes)."""
        ...

    async def receive(self) -> dict[str, Any]:
        """The next frame; :class:`TransportClosed` when the connection ends."""
        ...

    async def aclose(self) -> None:
        """Close the connection promptly (never blocks long)."""
        ...


_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _closed(exc: trio_websocket.ConnectionClosed) -> TransportClosed:
    reason = exc.reason
    if reason is None:
        return TransportClosed("WebSocket closed")
    return TransportClosed(str(reason.reason or reason.name or ""), reason.code)


class TcpTransport:
    """4-byte length prefix and a MessagePack map per frame."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(MAX_FRAME_BYTES)

    async def send(self, frame: dict[str, Any]) -> None:
        """Write one frame."""
        try:
            await self._stream.send_all(encode_frame(frame))
        except _IO_ERRORS as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    async def receive(self) -> dict[str, Any]:
        """The next frame."""
        while True:
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                raise TransportClosed(f"bad frame from server: {exc}") from exc
            if frame is not NEED_DATA:
                return frame
            try:
                data = await self._stream.receive_some(65536)
            except _IO_ERRORS as exc:
                raise TransportClosed(str(exc) or type(exc).__name__) from exc
            if not data:
                raise TransportClosed("server closed the connection")
            self._decoder.receive_data(data)

    async def aclose(self) -> None:
        """Close the socket."""
        await trio.aclose_forcefully(self._stream)


class WsTransport:
    """WebSocket at ``ws://host:port/ws``: binary MessagePack or text JSON.

    The connection's background task runs in the nursery given to
    :func:`open_transport`, which must outlive the transport.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, text: bool) -> None:
        self._ws = ws
        self._text = text
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self._failed: str | None = None
        self._recv_scope: trio.CancelScope | None = None

    def fail(self, reason: str) -> None:
        """trio-websocket's own task died: end :meth:`receive` with :class:`TransportClosed`."""
        self._failed = reason
        if self._recv_scope is not None:
            self._recv_scope.cancel()

    async def send(self, frame: dict[str, Any]) -> None:
        """Write one frame as one message."""
        if self._failed is not None:
            raise TransportClosed(self._failed)
        try:
            await self._ws.send_message(encode_ws(frame, text=self._text))
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from exc
        except _IO_ERRORS as exc:
            raise TransportClosed(str(exc) or type(exc).__name__) from exc

    async def receive(self) -> dict[str, Any]:
        """The next frame (a binary message may hold several)."""
        while not self._buffer:
            if self._failed is not None:
                raise TransportClosed(self._failed)
            try:
                with trio.CancelScope() as scope:
                    self._recv_scope = scope
                    message = await self._ws.get_message()
                self._recv_scope = None
                if scope.cancelled_caught:
                    raise TransportClosed(self._failed or "WebSocket failed")
            except trio_websocket.ConnectionClosed as exc:
                raise _closed(exc) from exc
            except _IO_ERRORS as exc:
                raise TransportClosed(str(exc) or type(exc).__name__) from exc
            try:
                self._buffer.extend(
                    decode_ws(
                        message,
                        max_frame_bytes=MAX_FRAME_BYTES,
                        max_message_bytes=MAX_MESSAGE_BYTES,
                    )
                )
            except FrameError as exc:
                raise TransportClosed(f"bad frame from server: {exc}") from exc
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """Close handshake for at most a second, then the socket regardless."""
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            # On cancellation trio-websocket closes the TCP stream itself.
            await self._ws.aclose()
        # When the server closed first, trio-websocket leaves the TCP stream
        # open (0.12); it has no public way to close it.
        stream = getattr(self._ws, "_stream", None)
        if stream is not None:
            await trio.aclose_forcefully(stream)


async def open_transport(
    nursery: trio.Nursery,
    host: str,
    port: int,
    *,
    kind: TransportKind = "tcp",
    encoding: Encoding = "msgpack",
    path: str = "/ws",
) -> Transport:
    """Connect to the server.

    Args:
        nursery: Where a WebSocket runs its background reader.
        host: Server host.
        port: Server port (the TCP or the WebSocket one, per ``kind``).
        kind: ``"tcp"`` or ``"ws"``.
        encoding: ``"msgpack"`` or ``"json"`` (JSON is WebSocket only).
        path: The WebSocket path.

    Returns:
        The connected transport.

    Raises:
        OSError: The connection could not be made (trio-websocket's handshake
            errors are turned into ``OSError`` too).
        ValueError: JSON asked over TCP.
    """
    if kind == "tcp":
        if encoding != "msgpack":
            raise ValueError("TCP carries MessagePack only; use transport='ws' for JSON")
        stream = await trio.open_tcp_stream(host, port)
        return TcpTransport(stream)
    if kind != "ws":
        raise ValueError(f"unknown transport {kind!r}")
    stream = await trio.open_tcp_stream(host, port)
    try:
        transport: WsTransport = await nursery.start(
            _run_ws, stream, f"{host}:{port}", path, encoding == "json"
        )
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return transport


async def _run_ws(
    stream: trio.SocketStream,
    host: str,
    path: str,
    text: bool,
    task_status: trio.TaskStatus[WsTransport],
) -> None:
    """Own one WebSocket and contain the failures of trio-websocket's reader task.

    That task may die of h11/wsproto errors (e.g. when the port is not a
    WebSocket server); they end the transport instead of the caller's nursery.
    """
    transport: WsTransport | None = None
    failure: BaseException | None = None
    try:
        async with trio.open_nursery() as inner:
            ws = await trio_websocket.wrap_client_stream(
                inner, stream, host, path, max_message_size=MAX_MESSAGE_BYTES
            )
            transport = WsTransport(ws, text=text)
            task_status.started(transport)
    except* Exception as group:  # noqa: BLE001 - contained on purpose; Cancelled is not an Exception
        failure = group.exceptions[0]
    if failure is None:
        return
    await trio.aclose_forcefully(stream)
    if transport is None:
        raise OSError(f"WebSocket ws://{host}{path} failed: {failure!r}") from failure
    transport.fail(f"WebSocket failed: {failure!r}")
