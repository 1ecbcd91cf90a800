"""TCP transport: 4-byte big-endian length-prefixed MessagePack maps (PROTOCOL §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from protocol.codec import NEED_DATA, FrameDecoder
from protocol.errors import FrameError

from .base import (
    FLUSH,
    Payload,
    Transport,
    TransportClosed,
    read_nowait,
    socket_fd,
    write_nowait,
)

RECEIVE_BYTES = 65536


class TcpTransport(Transport):
    """A session's view of a TCP stream."""

    kind = "tcp"

    def __init__(self, stream: trio.abc.Stream, *, max_frame_bytes: int, peer: str = "") -> None:
        self.stream = stream
        self.peer = peer
        self.decoder = FrameDecoder(max_frame_bytes)
        self.text = False
        self._sock = socket_fd(stream)
        self._rest = b""  # the unwritten end of a partial send_nowait

    def __repr__(self) -> str:
        return f"<TcpTransport {self.peer}>"

    async def receive(self) -> list[dict[str, Any]]:
        """Read until at least one whole frame is buffered; return all of them."""
        frames: list[dict[str, Any]] = []
        decoder = self.decoder
        while True:
            while True:
                try:
                    f = decoder.next_frame()
                except FrameError:
                    # Serve the good frames first; the decoder's error is
                    # sticky, so the next call raises it.
                    if frames:
                        return frames
                    raise
                if f is NEED_DATA:
                    break
                frames.append(f)  # type: ignore[arg-type]
            if frames:
                return frames
            sock = self._sock
            try:
                if sock is None:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                else:
                    # base.receive_some inlined: an idle connection parks in
                    # wait_readable right here, one coroutine frame less.
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
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise TransportClosed(str(e)) from None
            decoder.receive_data(data)
            if not data:
                f = decoder.next_frame()  # raises FrameError on a truncated frame
                if f is not NEED_DATA:
                    return [f]  # type: ignore[list-item]
                raise TransportClosed("peer closed")

    def send_nowait(self, payload: Payload) -> bool | None:
        """See :meth:`Transport.send_nowait`."""
        if self._sock is None or self._rest:
            return None
        return self._write_nowait(payload.tcp())

    def send_many_nowait(self, payloads: Sequence[Payload]) -> bool | None:
        """See :meth:`Transport.send_many_nowait`."""
        if self._sock is None or self._rest:
            return None
        return self._write_nowait(b"".join([p.tcp() for p in payloads]))

    def _write_nowait(self, data: bytes) -> bool | None:
        n = write_nowait(self._sock, data)
        if n is None:
            return None
        if n == len(data):
            return True
        self._rest = data[n:]
        return False

    async def send(self, payloads: Sequence[Payload]) -> None:
        """Join the framed payloads and write them at once."""
        if payloads and payloads[0] is FLUSH:
            payloads = payloads[1:]
        data = payloads[0].tcp() if len(payloads) == 1 else b"".join([p.tcp() for p in payloads])
        if self._rest:
            data, self._rest = self._rest + data, b""
        if not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise TransportClosed(str(e)) from None

    async def close(self, code: int | None = None, reason: str = "") -> None:
        """Close the stream (the code is a WebSocket notion, unused here)."""
        await trio.aclose_forcefully(self.stream)
