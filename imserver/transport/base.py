"""The one small interface both transports offer a session.

A session never knows whether it talks TCP or WebSocket (issue 2). It reads
frames with :meth:`Transport.receive`, sends batches of :class:`Payload` with
:meth:`Transport.send` (one coalesced ``send_all`` per call: STYLE practice 8,
only the session's writer task calls it), and ends with :meth:`Transport.close`.

Transport errors are mapped once, here, to :class:`TransportClosed`.
"""

from __future__ import annotations

import abc
import os
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

import trio

from protocol.codec import frame_prefix, pack, to_json


class TransportClosed(Exception):
    """The peer went away or the stream broke; the session ends."""


class Payload:
    """One outbound frame, encoded lazily and at most once per encoding.

    A push to many devices is one ``Payload`` shared by all their queues, so a
    group message is packed once, not once per member (issue 3).
    """

    __slots__ = ("_json", "_msgpack", "_tcp", "_ws_binary", "_ws_text", "frame")

    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self._msgpack: bytes | None = None
        self._tcp: bytes | None = None
        self._json: str | None = None
        self._ws_text: bytes | None = None
        self._ws_binary: bytes | None = None

    def __repr__(self) -> str:
        return f"<Payload op={self.frame.get('op')!r}>"

    def msgpack(self) -> bytes:
        """The MessagePack map."""
        b = self._msgpack
        if b is None:
            b = self._msgpack = pack(self.frame)
        return b

    def tcp(self) -> bytes:
        """Length prefix plus MessagePack map, as sent on TCP."""
        b = self._tcp
        if b is None:
            mp = self.msgpack()
            b = self._tcp = frame_prefix(mp) + mp
        return b

    def json(self) -> str:
        """Compact JSON text, as sent on a JSON WebSocket."""
        s = self._json
        if s is None:
            s = self._json = to_json(self.frame)
        return s

    def ws_text(self) -> bytes:
        """A whole server-to-client WebSocket text frame holding the JSON."""
        b = self._ws_text
        if b is None:
            b = self._ws_text = ws_frame(0x1, self.json().encode())
        return b

    def ws_binary(self) -> bytes:
        """A whole server-to-client WebSocket binary frame holding the one map."""
        b = self._ws_binary
        if b is None:
            b = self._ws_binary = ws_frame(0x2, self.msgpack())
        return b


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked WebSocket frame (RFC 6455 §5.2), as a server sends it.

    Built here rather than through wsproto for data messages: wsproto spends
    about 20 us per message building the same bytes, and a fan-out shares one
    framed copy between all connections of an encoding.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


#: Queued after a partial :meth:`Transport.send_nowait`: it carries no frame;
#: the writer's next :meth:`Transport.send` writes the kept rest first.
FLUSH = Payload({})


def socket_fd(stream: Any) -> Any:
    """The trio socket under ``stream`` if it has one (not for in-memory streams)."""
    sock = getattr(stream, "socket", None)
    return sock if sock is not None and hasattr(sock, "fileno") else None


def write_nowait(sock: Any, data: bytes) -> int | None:
    """Write what the socket takes now without blocking: bytes written, or None.

    The descriptor is looked up on every call: a closed socket reports -1,
    so a number the kernel reused for another connection is never written.
    """
    fd = sock.fileno()
    if fd < 0:
        return None

    def send_many_nowait(self, payloads: Sequence[Payload]) -> bool | None:
        """:meth:`send_nowait` for several frames in order, as one write."""
        if len(payloads) == 1:
            return self.send_nowait(payloads[0])
        return None

    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return None  # broken: the writer's next send reports it


def read_nowait(sock: Any, max_bytes: int) -> bytes | None:
    """Read what the socket has now without blocking: bytes (b"" at EOF), or None.

    The transports' readers call it and, on None, park in
    ``trio.lowlevel.wait_readable`` in their own frame: an idle connection
    then keeps three fewer suspended coroutine frames than inside
    ``SocketStream.receive_some`` (about 1.7 KB of server memory per idle
    connection, ``python -m bench idle``), with the same semantics: a
    cancellation point before the read, a scheduling point after a read that
    did not wait.

    The descriptor is looked up on every call (-1 once closed, so a number
    the kernel reused for another connection is never read).

    Raises:
        trio.ClosedResourceError: the socket is closed.
        trio.BrokenResourceError: the read failed (connection reset, ...).
    """
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("socket closed")
    try:
        return os.read(fd, max_bytes)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        raise trio.BrokenResourceError(f"socket read failed: {e}") from e


class Transport(abc.ABC):
    """A framed, bidirectional connection to one client."""

    kind: ClassVar[str]
    peer: str

    def send_nowait(self, payload: Payload) -> bool | None:
        """Write ``payload`` at once if that can neither block nor reorder bytes.

        The fast path of a push to an idle connection (no writer task switch,
        no queue): the session calls it only when its queue is empty and its
        writer is not inside :meth:`send`.

        Returns:
            True: all written. False: written in part; the transport keeps the
            rest and the next :meth:`send` writes it first (the session queues
            :data:`FLUSH` to make that happen). None: not attempted; queue it.
        """
        return None

    @abc.abstractmethod
    async def receive(self) -> list[dict[str, Any]]:
        """Wait for and return the next frames (at least one).

        Raises:
            protocol.errors.FrameError: the peer sent a malformed frame.
            TransportClosed: the peer closed or the stream broke.
        """

    @abc.abstractmethod
    async def send(self, payloads: Sequence[Payload]) -> None:
        """Send frames in order with one write.

        Raises:
            TransportClosed: the stream broke.
        """

    @abc.abstractmethod
    async def close(self, code: int | None = None, reason: str = "") -> None:
        """Close the connection (WebSocket: with ``code``), bounded in time, never raising."""
