"""WebSocket transport: h11 for the opening handshake, wsproto for the frames (PROTOCOL §1-2).

Theory of operation
-------------------
**Handshake.** :meth:`WebSocketTransport.accept` parses the upgrade request
with an ``h11.Connection`` whose ``max_incomplete_event_size`` is
``max_handshake_bytes``, so a request that never ends is refused after at
most that many bytes plus one read. It checks the request itself (RFC 6455
§4.2.1), answers ``101`` with ``Sec-WebSocket-Accept``, and keeps the bytes
h11 read past the request (``trailing_data``: frames a client sent without
waiting for the ``101``) for the first ``receive``, which feeds them to a bare
``wsproto.connection.Connection``. Refusals are fixed byte strings: 404 for
another path, 426 for another ``Sec-WebSocket-Version``, 400 for anything
else (not HTTP, over the size limit, not an upgrade, a body, a bad key);
then the stream is closed and ``accept`` returns ``None``. The h11 object
dies with ``accept``.

We do not use ``wsproto.WSConnection`` for the server handshake because (1)
its h11 buffer limit is fixed at 16 KiB, (2) wsproto 1.3's server side drops
bytes that arrive in the same read as the request (``H11Handshake._accept``
builds the ``Connection`` without ``trailing_data``), and (3) it keeps the h11
connection alive for the life of the socket. No extensions are negotiated,
so permessage-deflate is off.

**Receiving.** One :meth:`~WebSocketTransport.receive` call reads at most
``RECEIVE_BYTES`` per ``receive_some``, feeds wsproto, and processes *all*
pending events: one read may complete many messages, and a binary message may
hold several MessagePack maps, so one call returns every frame decoded so
far. wsproto hands out data frames piece by piece as bytes arrive (only
control frames, at most 125 bytes, are held back whole), so wsproto itself
buffers no more than one read. Fragments of a message are collected here,
and their running size is checked on every piece: a message whose bytes
(UTF-8 bytes for text) pass ``max_message_bytes`` is closed with 1009 and
no error frame, as soon as the limit is passed (PROTOCOL §2). A complete
message goes to :func:`protocol.codec.decode_ws`, which bounds each map by
``max_frame_bytes`` and raises :class:`~protocol.errors.FrameError`; so does
a message of the other type than the first (the first data message fixes
:attr:`~WebSocketTransport.text`, PROTOCOL §1). On ``FrameError`` the session
sends ``bad_frame`` and calls ``close(1002)``.

A failure found after some frames in the same read is kept, and the frames
are returned first; the next call raises it. So a frame followed at once by
a close frame is still delivered.

Bad WebSocket framing from the peer (wsproto reports it as a
``CloseConnection`` event while our state stays ``OPEN``) is answered with a
close frame of wsproto's code (1002, or 1007 for bad UTF-8) and
:class:`~imserver.transport.base.TransportClosed`. A close frame from the
peer is echoed and the TCP stream closed (the server closes TCP first, RFC
6455 §7.1.1). EOF, ``BrokenResourceError`` and ``ClosedResourceError`` all
become ``TransportClosed`` (STYLE practice 11).

**Sending.** :meth:`~WebSocketTransport.send` makes one ``send_all`` per
call. On a MessagePack connection consecutive maps are packed back to back
into binary messages of at most ``max_message_bytes`` (one map larger than
that still goes, alone); on a JSON connection every frame is its own text
message. Before the client's first data message the encoding is unknown and
the server sends MessagePack.

**One writer, and the one exception.** Only the session's writer task calls
``send`` (STYLE practice 8), but RFC 6455 §5.5.2 wants a Pong for every Ping,
and the reader is the one that sees the Ping. Receive-side writes (Pong, the
close frame of a receive-side close) therefore go through ``_lock``, a
``trio.Lock`` held around every ``send_all``; it keeps the stream's byte order
whole, where trio's conflict detector would otherwise (correctly) raise
``BusyResourceError``. The reader never *waits* for that lock to write a Pong:
it keeps the Pong bytes in ``_control`` (only the newest, as §5.5.3 allows,
so a ping flood cannot grow it) and whoever holds the lock writes them after
its own data. The reader writes a pending Pong only at the top of its read
loop, never after it has decoded frames, so a cancellation there loses no
frame. The uncontended lock costs one ``acquire_nowait``.

**Closing.** :meth:`~WebSocketTransport.close` is idempotent and never
raises. It sends the close frame and then, in a shielded scope bounded by
``CLOSE_TIMEOUT``, waits for the peer's close frame: if a reader task is
inside ``receive`` it watches for it and wakes ``close``; else ``close``
reads (and discards, at most ``2 * max_message_bytes`` plus one read) itself.
Waiting for the reply keeps unread client data out of our socket buffer when
it is closed, which would make the kernel send RST and could destroy our
close frame before the client reads it. Then the stream is closed with
``trio.aclose_forcefully``. A receive-side 1009 close drains the same way;
after bad framing (the parser is dead) and after the peer's own close frame
nothing is awaited.

**Memory.** An idle transport holds this object (``__slots__``, 176 bytes),
the wsproto ``Connection`` (~1.7 KB with its deque, decoders and parser
generator) and a ``trio.Lock`` (~0.35 KB): about 2.3 KB by tracemalloc, the
stream not counted. Partial messages are released when a message completes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, generate_accept_token

from protocol.codec import decode_ws
from protocol.errors import WS_CLOSE_TOO_BIG, FrameError

from .base import (
    FLUSH,
    Payload,
    Transport,
    TransportClosed,
    read_nowait,
    socket_fd,
    write_nowait,
    ws_frame,
)

__all__ = ["CLOSE_TIMEOUT", "RECEIVE_BYTES", "WebSocketTransport"]

#: Largest single read; also bounds what wsproto buffers at a time.
RECEIVE_BYTES = 65536
#: How long :meth:`WebSocketTransport.close` tries to finish the closing handshake.
CLOSE_TIMEOUT = 1.0
#: Close code for an internal error; used if ``close`` is given a code no frame may carry.
_CLOSE_INTERNAL = 1011

_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: %s\r\n\r\n"
)
_REFUSALS: dict[int, bytes] = {
    400: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    404: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    426: (
        b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    ),
}
_OPEN = ConnectionState.OPEN
_REMOTE_CLOSING = ConnectionState.REMOTE_CLOSING
_LOCAL_CLOSING = ConnectionState.LOCAL_CLOSING
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class _Shutdown:
    """A receive-side failure that ends the connection: what to send, then what to raise."""

    __slots__ = ("code", "drain", "reason", "why")

    def __init__(self, code: int | None, reason: str, why: str, *, drain: bool) -> None:
        self.code = code
        self.reason = reason
        self.why = why
        self.drain = drain


def _tokens(value: bytes) -> set[bytes]:
    """The lower-cased tokens of a comma-separated header value."""
    return {t.strip().lower() for t in value.split(b",")}


def _check_request(request: h11.Request, path: bytes) -> tuple[int, bytes]:
    """Check an opening handshake (RFC 6455 §4.2.1).

    Returns:
        ``(0, key)`` for a valid upgrade request, else ``(status, b"")`` with
        the HTTP status to refuse it with (404, 426 or 400).
    """
    if request.target.split(b"?", 1)[0] != path:
        return 404, b""
    if request.method != b"GET" or request.http_version != b"1.1":
        return 400, b""
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers:  # h11 lower-cases the names
        headers[name] = headers[name] + b", " + value if name in headers else value
    if headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
        return 400, b""  # an upgrade request has no body
    if b"upgrade" not in _tokens(headers.get(b"connection", b"")) or b"websocket" not in _tokens(
        headers.get(b"upgrade", b"")
    ):
        return 400, b""
    version = headers.get(b"sec-websocket-version")
    if version != b"13":
        return (426 if version else 400), b""
    key = headers.get(b"sec-websocket-key", b"")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return 400, b""
    except (binascii.Error, ValueError):
        return 400, b""
    return 0, key


class WebSocketTransport(Transport):
    """A session's view of one server-side WebSocket (RFC 6455, no extensions).

    Create it with :meth:`accept`. :attr:`text` is ``None`` until the
    client's first data message, then ``True`` for JSON text or ``False`` for
    MessagePack binary.
    """

    kind = "ws"

    __slots__ = (
        "_close_event",
        "_closed",
        "_conn",
        "_control",
        "_failure",
        "_lock",
        "_max_frame_bytes",
        "_max_message_bytes",
        "_parts",
        "_reading",
        "_rest",
        "_size",
        "_sock",
        "_stream",
        "_unread",
        "peer",
        "text",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        conn: Connection,
        *,
        max_frame_bytes: int,
        max_message_bytes: int,
        peer: str = "",
        unread: bytes = b"",
    ) -> None:
        """Wrap an already upgraded stream; use :meth:`accept` instead.

        Args:
            stream: The stream, after the ``101`` response.
            conn: A server-side wsproto connection in state ``OPEN``.
            max_frame_bytes: Bound on each map (and each JSON text), PROTOCOL §1.
            max_message_bytes: Bound on each message, inbound and outbound.
            peer: The peer's address, for logs.
            unread: Bytes that arrived after the handshake request.
        """
        self._stream = stream
        self._conn = conn
        self._max_frame_bytes = max_frame_bytes
        self._max_message_bytes = max_message_bytes
        self.peer = peer
        self.text: bool | None = None
        self._unread = unread
        # A partial message: its pieces and their size in bytes.
        self._parts: list[Any] | None = None
        self._size = 0
        # The newest Pong not yet written.
        self._control: bytes | None = None
        # A failure to raise once the frames decoded before it are delivered.
        self._failure: FrameError | _Shutdown | None = None
        self._lock = trio.Lock()
        self._closed = False
        self._sock = socket_fd(stream)
        self._rest = b""  # the unwritten end of a partial send_nowait
        self._reading = False
        self._close_event: trio.Event | None = None

    def __repr__(self) -> str:
        encoding = {None: "unknown", True: "json", False: "msgpack"}[self.text]
        state = "closed" if self._closed else self._conn.state.name.lower()
        return f"<WebSocketTransport {self.peer} {encoding} {state}>"

    # -- handshake -----------------------------------------------------------

    @classmethod
    async def accept(
        cls,
        stream: trio.abc.Stream,
        *,
        path: str = "/ws",
        max_frame_bytes: int = 65536,
        max_message_bytes: int = 1048576,
        max_handshake_bytes: int = 16384,
        peer: str = "",
    ) -> WebSocketTransport | None:
        """Perform the server side of the opening handshake.

        The caller bounds the time this takes with its own cancel scope; if
        cancelled, the stream is left to the caller to close.

        Args:
            stream: A freshly accepted stream.
            path: The only request path accepted (a query string is ignored).
            max_frame_bytes: Bound on each map (and JSON text), PROTOCOL §1.
            max_message_bytes: Bound on each whole message, PROTOCOL §1.
            max_handshake_bytes: Bound on the request line plus headers.
            peer: The peer's address, for logs.

        Returns:
            The open transport, or ``None`` when no WebSocket results: the
            request was refused (404 for another path, 426 for another
            protocol version, 400 otherwise) or the peer went away, and the
            stream has been closed.
        """
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=max_handshake_bytes)
        read_size = min(RECEIVE_BYTES, max_handshake_bytes + 1)
        status = 400
        try:
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError:
                    break  # not HTTP, or over max_handshake_bytes: 400
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(read_size)
                    if not data:
                        status = 0  # the peer left: nobody to answer
                        break
                    h.receive_data(bytes(data))
                    continue
                # We never feed h11 an EOF, so the first event is the request.
                assert type(event) is h11.Request, event
                status, key = _check_request(event, path.encode())
                if status == 0:
                    await stream.send_all(_SWITCHING % generate_accept_token(key))
                    # A checked request has no body, so all that h11 holds past
                    # its headers is WebSocket data sent without waiting for us.
                    return cls(
                        stream,
                        Connection(ConnectionType.SERVER),
                        max_frame_bytes=max_frame_bytes,
                        max_message_bytes=max_message_bytes,
                        peer=peer,
                        unread=h.trailing_data[0],
                    )
                break
            if status:
                await stream.send_all(_REFUSALS[status])
        except _BROKEN:
            pass
        await trio.aclose_forcefully(stream)
        return None

    # -- receiving -----------------------------------------------------------

    async def receive(self) -> list[dict[str, Any]]:
        """Wait for and return the frames of the next complete message(s).

        Returns:
            At least one frame; all frames of all messages completed by one read.

        Raises:
            protocol.errors.FrameError: The peer sent a message that is not
                well-formed frames, or mixed text and binary messages. The
                caller sends ``bad_frame`` and calls ``close(1002)``.
            TransportClosed: The peer closed (its close frame was answered),
                broke the stream, sent bad WebSocket framing (answered with
                1002/1007) or a message over ``max_message_bytes`` (answered
                with 1009); or :meth:`close` was called. The stream is closed.
        """
        if self._closed:
            raise TransportClosed("connection closed")
        if self._failure is not None:
            await self._fail()
        self._reading = True
        try:
            return await self._receive()
        finally:
            self._reading = False
            waiting = self._close_event
            if waiting is not None:
                waiting.set()  # close() waits for no reader now

    async def _receive(self) -> list[dict[str, Any]]:
        stream = self._stream
        conn = self._conn
        while True:
            if self._control is not None and not self._lock.locked():
                try:
                    await self._flush_control()
                except _BROKEN as e:
                    await self._abort()
                    raise TransportClosed(str(e) or "stream broken") from None
            if self._closed:
                # close() ran in another task while we were writing: it waits for us.
                await self._drain_for_closer()
            data: bytes | bytearray = self._unread
            if data:
                self._unread = b""
            else:
                sock = self._sock
                try:
                    if sock is None:
                        data = await stream.receive_some(RECEIVE_BYTES)
                    else:
                        # Parked in wait_readable right here, not three frames
                        # deeper in SocketStream.receive_some: less memory per
                        # idle connection (same semantics, see TcpTransport).
                        await trio.lowlevel.checkpoint_if_cancelled()
                        waited = False
                        while True:
                            got = read_nowait(sock, RECEIVE_BYTES)
                            if got is not None:
                                break
                            await trio.lowlevel.wait_readable(sock)
                            waited = True
                        if not waited:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        data = got
                except _BROKEN as e:
                    await self._abort()
                    raise TransportClosed(str(e) or "stream broken") from None
                if self._closed:
                    # close() ran in another task while we waited: it waits for us.
                    await self._drain_for_closer(data)
                if not data:
                    await self._abort()
                    raise TransportClosed("peer closed the stream without a close frame")
            conn.receive_data(data)  # type: ignore[arg-type]  # wsproto takes any bytes-like
            frames = self._process_events()
            if frames:
                return frames
            if self._failure is not None:
                await self._fail()

    def _process_events(self) -> list[dict[str, Any]]:
        """Handle every pending wsproto event; no I/O.

        Returns the frames of the messages completed; a failure is stored
        in ``_failure`` and stops the processing.
        """
        frames: list[dict[str, Any]] = []
        conn = self._conn
        limit = self._max_message_bytes
        # Any: wsproto's events are told apart by exact type below, for speed.
        events: Iterator[Any] = conn.events()
        for event in events:
            kind = type(event)
            if kind is BytesMessage or kind is TextMessage:
                data = event.data
                is_text = kind is TextMessage
                if self.text is not is_text:
                    if self.text is not None:
                        self._failure = FrameError("mixed text and binary")
                        break
                    self.text = is_text  # PROTOCOL §1: the first message fixes the encoding
                size = len(data) if not is_text or data.isascii() else len(data.encode())
                parts = self._parts
                if parts is not None:
                    size += self._size
                if size > limit:
                    self._parts = None
                    self._failure = _Shutdown(
                        WS_CLOSE_TOO_BIG,
                        "message too big",
                        f"message over max_message_bytes ({limit})",
                        drain=True,
                    )
                    break
                if event.message_finished:
                    if parts is not None:
                        parts.append(data)
                        data = "".join(parts) if is_text else b"".join(parts)
                        self._parts = None
                    try:
                        frames += decode_ws(
                            data,
                            max_frame_bytes=self._max_frame_bytes,
                            max_message_bytes=limit,
                        )
                    except FrameError as e:
                        self._failure = e
                        break
                elif parts is None:
                    self._parts = [data]
                    self._size = size
                else:
                    parts.append(data)
                    self._size = size
            elif kind is Ping:
                if conn.state is _OPEN:
                    self._control = conn.send(Pong(payload=event.payload))
            elif kind is CloseConnection:
                code: int = event.code
                reason: str = event.reason or ""
                if conn.state is _REMOTE_CLOSING:
                    # RFC 6455 §5.5.1: echo the peer's code.
                    self._failure = _Shutdown(code, reason, f"peer closed ({code})", drain=False)
                else:
                    # wsproto reports bad framing as a close event and stays OPEN.
                    self._failure = _Shutdown(
                        code, "", f"bad WebSocket framing: {reason}", drain=False
                    )
                break
            # A Pong needs nothing.
        return frames

    async def _fail(self) -> None:
        """Raise the stored failure, closing first if it ends the connection."""
        failure = self._failure
        if isinstance(failure, FrameError):
            raise failure
        assert failure is not None
        # We are the reader here, so never wait for one.
        await self._close(failure.code, failure.reason, drain=failure.drain, await_reader=False)
        raise TransportClosed(failure.why)

    async def _drain_for_closer(self, data: bytes | bytearray = b"") -> NoReturn:
        """As the reader, look for the peer's close frame on behalf of :meth:`close`.

        ``close`` bounds this: when its time is up it closes the stream,
        which ends our read with ``ClosedResourceError``.
        """
        try:
            await self._drain(data)
        except _BROKEN:
            pass
        raise TransportClosed("connection closed")

    async def _flush_control(self) -> None:
        """Write the pending Pong; only when nobody holds the lock."""
        lock = self._lock
        lock.acquire_nowait()
        try:
            while (data := self._control) is not None:
                self._control = None
                if self._rest:  # never inside a frame a direct write left half-sent
                    data, self._rest = self._rest + data, b""
                await self._stream.send_all(data)
        finally:
            lock.release()

    def _direct_ok(self) -> bool:
        return not (
            self._sock is None
            or self._rest
            or self._closed
            or self._control is not None
            or self._lock.locked()
            or self._conn.state is not _OPEN
        )

    def send_nowait(self, payload: Payload) -> bool | None:
        """See :meth:`Transport.send_nowait` (only in the OPEN state, lock free)."""
        if not self._direct_ok():
            return None
        return self._write_nowait(payload.ws_text() if self.text else payload.ws_binary())

    def send_many_nowait(self, payloads: Sequence[Payload]) -> bool | None:
        """See :meth:`Transport.send_many_nowait`: maps packed as :meth:`send` packs them."""
        if not self._direct_ok():
            return None
        return self._write_nowait(self._encode(payloads))

    def _write_nowait(self, data: bytes) -> bool | None:
        n = write_nowait(self._sock, data)
        if n is None:
            return None
        if n == len(data):
            return True
        self._rest = data[n:]
        return False

    # -- sending -------------------------------------------------------------

    async def send(self, payloads: Sequence[Payload]) -> None:
        """Send frames in order with one ``send_all``.

        Args:
            payloads: The frames; binary MessagePack unless the client chose
                JSON text with its first message.

        Raises:
            TransportClosed: The stream broke, or the connection is closing.
        """
        if payloads and payloads[0] is FLUSH:
            payloads = payloads[1:]
        if not payloads and not self._rest:
            return
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()  # a Pong or a close frame is being written
        try:
            if self._closed:
                raise TransportClosed("connection closed")
            try:
                data = self._encode(payloads) if payloads else b""
            except LocalProtocolError:
                # The peer's close frame arrived; the reader answers it.
                raise TransportClosed("connection closing") from None
            control = self._control
            if control is not None:
                self._control = None
                data = control + data
            if self._rest:
                data, self._rest = self._rest + data, b""
            stream = self._stream
            await stream.send_all(data)
            while (control := self._control) is not None:  # queued while we wrote
                self._control = None
                await stream.send_all(control)
        except _BROKEN as e:
            raise TransportClosed(str(e) or "stream broken") from None
        finally:
            lock.release()

    def _encode(self, payloads: Sequence[Payload]) -> bytes:
        """The wire bytes of ``payloads``: MessagePack maps packed, or JSON texts.

        Data frames are built by :func:`~imserver.transport.base.ws_frame` (and
        cached on the shared ``Payload``); wsproto keeps no state for whole
        data messages. Outside the OPEN state wsproto is asked as before, and
        refuses (``LocalProtocolError``).
        """
        if self._conn.state is not _OPEN:
            self._conn.send(Message(data=b""))  # raises LocalProtocolError
        if self.text:
            if len(payloads) == 1:
                return payloads[0].ws_text()
            return b"".join([p.ws_text() for p in payloads])
        if len(payloads) == 1:
            return payloads[0].ws_binary()
        limit = self._max_message_bytes
        out: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for p in payloads:
            packed = p.msgpack()
            n = len(packed)
            if size + n > limit and batch:
                out.append(ws_frame(0x2, b"".join(batch)))
                batch = []
                size = 0
            batch.append(packed)
            size += n
        out.append(ws_frame(0x2, b"".join(batch)))
        return b"".join(out)

    # -- closing -------------------------------------------------------------

    async def close(self, code: int | None = None, reason: str = "") -> None:
        """Close with ``code`` (no code if ``None``), bounded in time; never raises.

        Sends the close frame, waits up to :data:`CLOSE_TIMEOUT` for the
        peer's close frame, then closes the stream. Calling it again does
        nothing.

        Args:
            code: The close code: 1000 normal, 1002 protocol error, 1008
                auth, 1009 too big, 4001-4006 kicks (PROTOCOL §2).
            reason: A short text for the close frame (at most 123 bytes are sent).
        """
        reading = self._reading
        await self._close(code, reason, drain=not reading, await_reader=reading)

    async def _close(
        self, code: int | None, reason: str, *, drain: bool, await_reader: bool
    ) -> None:
        """Send the close frame, await the reply within :data:`CLOSE_TIMEOUT`, close the stream.

        Args:
            code: The close code, or ``None`` for a close frame without one.
            reason: The close reason (ignored without a code).
            drain: This task may read the stream to await the peer's close frame.
            await_reader: Another task is inside :meth:`receive`; let it see
                the peer's close frame and wake us.
        """
        if self._closed:
            return
        self._closed = True
        self._control = None
        conn = self._conn
        failure = self._failure
        if code is None and conn.state is _REMOTE_CLOSING and isinstance(failure, _Shutdown):
            code, reason = failure.code, failure.reason  # echo the peer's close (RFC 6455 §5.5.1)
        if code is None:
            event = CloseConnection(code=CloseReason.NO_STATUS_RCVD)  # sent with no code
        else:
            if not 1000 <= code <= 4999:
                code = _CLOSE_INTERNAL
            event = CloseConnection(code=code, reason=reason)
        data = self._rest
        self._rest = b""
        if conn.state is _OPEN or conn.state is _REMOTE_CLOSING:
            data += conn.send(event)
        with trio.CancelScope(deadline=trio.current_time() + CLOSE_TIMEOUT, shield=True):
            try:
                if data:
                    async with self._lock:
                        await self._stream.send_all(data)
                if conn.state is _LOCAL_CLOSING:
                    if drain:
                        await self._drain()
                    elif await_reader and self._reading:
                        self._close_event = reply = trio.Event()
                        await reply.wait()
            except _BROKEN:
                pass
        await trio.aclose_forcefully(self._stream)

    async def _drain(self, data: bytes | bytearray = b"") -> None:
        """Read and discard until the peer's close frame, EOF or a byte budget.

        Only the task allowed to read calls this; ``data`` was read already.
        """
        conn = self._conn
        budget = 2 * self._max_message_bytes + RECEIVE_BYTES
        while conn.state is _LOCAL_CLOSING and budget > 0:
            if data:
                budget -= len(data)
                conn.receive_data(data)  # type: ignore[arg-type]
                for event in conn.events():
                    if type(event) is CloseConnection:
                        return
            data = await self._stream.receive_some(RECEIVE_BYTES)
            if not data:
                return

    async def _abort(self) -> None:
        """Close the stream without a closing handshake (EOF or a broken stream)."""
        self._closed = True
        self._control = None
        await trio.aclose_forcefully(self._stream)
