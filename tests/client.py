"""A small synchronous-style test client over TCP or WebSocket (trio-websocket).

No background task: :meth:`TestClient.request` reads until its reply arrives and
keeps every push it sees on the way in ``pushes``, in arrival order.
"""

from __future__ import annotations

import collections
import itertools
import json
from typing import Any

import trio
import trio_websocket

from protocol.codec import NEED_DATA, FrameDecoder, decode_ws, encode_frame, encode_ws


class Closed(Exception):
    """The server closed the connection."""

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"closed code={code} reason={reason}")
        self.code = code


class TestClient:
    """One connection to the server under test."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.pushes: collections.deque[dict[str, Any]] = collections.deque()
        self._rids = itertools.count(1)
        self.user = ""
        self.token = ""
        self.kind = ""

    @classmethod
    async def tcp(cls, port: int) -> TestClient:
        self = cls()
        self.kind = "tcp"
        self.stream = await trio.open_tcp_stream("127.0.0.1", port)
        self.decoder = FrameDecoder(1 << 24)
        return self

    @classmethod
    async def ws(
        cls, nursery: trio.Nursery, port: int, *, text: bool = False, path: str = "/ws"
    ) -> TestClient:
        """A WebSocket client whose background reader lives in ``nursery``."""
        self = cls()
        self.kind = "ws-json" if text else "ws"
        self.text = text
        self.ws = await trio_websocket.connect_websocket_url(
            nursery, f"ws://127.0.0.1:{port}{path}", max_message_size=1 << 26
        )
        return self

    async def aclose(self) -> None:
        if self.kind == "tcp":
            await self.stream.aclose()
        else:
            await self.ws.aclose()
            # trio-websocket leaves its TCP stream open when the server closed first.
            await self.ws._stream.aclose()

    async def send_frame(self, frame: dict[str, Any]) -> None:
        if self.kind == "tcp":
            await self.stream.send_all(encode_frame(frame))
        else:
            await self.ws.send_message(encode_ws(frame, text=self.text))

    async def send_raw(self, data: bytes | str) -> None:
        if self.kind == "tcp":
            assert isinstance(data, bytes)
            await self.stream.send_all(data)
        else:
            await self.ws.send_message(data)

    async def recv_frame(self) -> dict[str, Any]:
        """The next frame from the server (raises Closed at EOF/close)."""
        if self.kind == "tcp":
            while True:
                f = self.decoder.next_frame()
                if f is not NEED_DATA:
                    return f  # type: ignore[return-value]
                data = await self.stream.receive_some(65536)
                if not data:
                    raise Closed()
                self.decoder.receive_data(data)
        if not hasattr(self, "_ws_buf"):
            self._ws_buf: collections.deque[dict[str, Any]] = collections.deque()
        while not self._ws_buf:
            try:
                msg = await self.ws.get_message()
            except trio_websocket.ConnectionClosed as e:
                raise Closed(e.reason.code, e.reason.reason) from None
            if isinstance(msg, str):
                self._ws_buf.append(json.loads(msg))
            else:
                self._ws_buf.extend(
                    decode_ws(msg, max_frame_bytes=1 << 24, max_message_bytes=1 << 26)
                )
        return self._ws_buf.popleft()

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send ``op`` with a fresh rid and return its reply (ok, pong or error)."""
        rid = next(self._rids)
        await self.send_frame({"op": op, "rid": rid, **fields})
        while True:
            f = await self.recv_frame()
            if f.get("rid") == rid and f["op"] in ("ok", "error", "pong"):
                return f
            self.pushes.append(f)

    async def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        """Like :meth:`request` but asserts success."""
        reply = await self.request(op, **fields)
        assert reply["op"] in ("ok", "pong"), reply
        return reply

    async def push(self, op: str | None = None) -> dict[str, Any]:
        """The next push (of ``op`` if given; others before it are kept)."""
        for i, f in enumerate(self.pushes):
            if op is None or f["op"] == op:
                del self.pushes[i]
                return f
        while True:
            f = await self.recv_frame()
            if op is None or f["op"] == op:
                return f
            self.pushes.append(f)

    async def closed(self) -> tuple[list[dict[str, Any]], int | None]:
        """Read until the server closes; return the frames seen and the close code."""
        frames = []
        try:
            while True:
                frames.append(await self.recv_frame())
        except Closed as c:
            return frames, c.code
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return frames, None

    async def login(
        self, user: str, password: str = "password1", device: str = "default", register: bool = True
    ) -> dict[str, Any]:
        op = "register" if register else "login"
        reply = await self.ok(op, user=user, password=password, device=device)
        self.user = user
        self.token = reply["token"]
        return reply
