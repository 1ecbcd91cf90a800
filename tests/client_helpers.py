"""Helpers for the tests of the ``clients`` library (tests/test_client_*.py).

* :class:`Recorder` drains a client's events in the background and lets a
  test wait for one that matches.
* :class:`Users` opens library clients against the test server.
* :class:`Proxy` is a TCP relay between a client and the server that can
  stop passing the server's bytes ("freeze"), to make pongs and replies go
  missing without touching the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from clients import Client, Event, Message, Push
from imserver.app import ServerInfo

PASSWORD = "password1"
#: (transport, encoding) pairs every chat test runs over.
KINDS = [("tcp", "msgpack"), ("ws", "msgpack"), ("ws", "json")]
KIND_IDS = ["tcp", "ws", "ws-json"]


class Recorder:
    """Collects every event of one client, in order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []
        self.ended = False
        self._changed = trio.Event()

    async def run(self) -> None:
        async for event in self.client.events():
            self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    def messages(self, conv: str | None = None) -> list[Message]:
        """The messages seen so far (of ``conv`` if given)."""
        return [
            e for e in self.events if isinstance(e, Message) and (conv is None or e.conv == conv)
        ]

    def pushes(self, op: str) -> list[Push]:
        """The pushes of ``op`` seen so far."""
        return [e for e in self.events if isinstance(e, Push) and e.op == op]

    async def wait_for(self, pred: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The first event (seen so far or later) for which ``pred`` holds."""
        with trio.fail_after(timeout):
            checked = 0
            while True:
                for e in self.events[checked:]:
                    if pred(e):
                        return e
                checked = len(self.events)
                if self.ended:
                    raise AssertionError("event stream ended")
                await self._changed.wait()

    async def wait_until(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``pred()`` holds (re-checked after every event)."""
        with trio.fail_after(timeout):
            while not pred():
                if self.ended:
                    raise AssertionError("event stream ended")
                await self._changed.wait()

    async def message(self, conv: str, seq: int, timeout: float = 10.0) -> Message:
        """Wait for message ``seq`` of ``conv``."""
        e = await self.wait_for(
            lambda e: isinstance(e, Message) and e.conv == conv and e.seq == seq, timeout
        )
        assert isinstance(e, Message)
        return e

    async def push(self, op: str, timeout: float = 10.0, **match: Any) -> Push:
        """Wait for a push of ``op`` whose fields include ``match``."""
        e = await self.wait_for(
            lambda e: (
                isinstance(e, Push) and e.op == op and all(e.get(k) == v for k, v in match.items())
            ),
            timeout,
        )
        assert isinstance(e, Push)
        return e


class Users:
    """Opens registered, recorded library clients; closes them at the end."""

    def __init__(
        self, nursery: trio.Nursery, kind: tuple[str, str], tcp_port: int, ws_port: int
    ) -> None:
        self.nursery = nursery
        self.transport, self.encoding = kind
        self.tcp_port = tcp_port
        self.ws_port = ws_port
        self.opened: list[Client] = []
        self.recorders: dict[Client, Recorder] = {}

    def client(self, **options: Any) -> Client:
        """A client (not started) for this transport."""
        options.setdefault("transport", self.transport)
        port = self.tcp_port if options["transport"] == "tcp" else self.ws_port
        options.setdefault("encoding", self.encoding)
        return Client("127.0.0.1", options.pop("port", port), **options)

    async def open(
        self, name: str, *, register: bool = True, record: bool = True, **options: Any
    ) -> Client:
        """Start a client, register (or log in) ``name``, and record its events."""
        c = self.client(**options)
        await c.start(self.nursery)
        self.opened.append(c)
        if register:
            await c.register(name, PASSWORD)
        else:
            await c.login(name, PASSWORD)
        if record:
            rec = Recorder(c)
            self.recorders[c] = rec
            self.nursery.start_soon(rec.run)
        return c

    def rec(self, c: Client) -> Recorder:
        """The recorder of ``c``."""
        return self.recorders[c]

    async def aclose(self) -> None:
        for c in self.opened:
            await c.aclose()


@contextlib.asynccontextmanager
async def open_users(info: ServerInfo, kind: tuple[str, str]) -> AsyncIterator[Users]:
    """:class:`Users` for a server; every client is closed on exit."""
    assert info.tcp_port is not None
    assert info.ws_port is not None
    async with trio.open_nursery() as nursery:
        users = Users(nursery, kind, info.tcp_port, info.ws_port)
        try:
            yield users
        finally:
            await users.aclose()
            nursery.cancel_scope.cancel()


async def befriend(a: Client, b: Client) -> None:
    """Make ``a`` and ``b`` friends through the library."""
    assert b.user is not None
    assert a.user is not None
    assert await a.friend_request(b.user, "hello") == "requested"
    assert await b.friend_accept(a.user) == "accepted"


class Proxy:
    """A TCP relay to ``127.0.0.1:target``; :meth:`freeze` stalls the current links.

    Freezing stops passing the server's bytes to the client on every link
    open at that moment (they are dropped, as a dead network would); links
    made later pass everything.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.links: list[dict[str, bool]] = []
        self.accepted = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    def freeze(self) -> None:
        """Stop passing server bytes on every current link."""
        for link in self.links:
            link["frozen"] = True

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        link = {"frozen": False}
        self.links.append(link)
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError:
            await downstream.aclose()
            return
        async with downstream, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, down: bool) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await src.receive_some(65536):
                        if down and link["frozen"]:
                            continue
                        await dst.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, downstream, upstream, False)
            nursery.start_soon(pump, upstream, downstream, True)
