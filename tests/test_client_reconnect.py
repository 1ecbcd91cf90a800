"""Reliability of the client library: heartbeats, reconnects, resends, catch-up.

* Against the real server through a :class:`~tests.client_helpers.Proxy`
  that stops passing the server's bytes: the client notices the missing
  pong, reconnects, resends its unacknowledged send with the same ``cid``
  and fetches what it missed, so the application sees everything once.
* Under Trio's ``MockClock`` (autojump) with an in-memory fake server, so
  no database thread is involved: the exact ping period, pong timeout and
  reconnect schedule.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing

import clients.client as client_module
from clients import Client, ClientClosed, ConnectionLost, Message
from clients.transport import TransportClosed
from imserver.app import ServerInfo

from .client_helpers import Proxy, Recorder, Users, befriend, open_users
from .conftest import running_server, test_config
from .test_durability import free_port

# --------------------------------------------------------------- real server


async def test_no_pong_reconnects_and_loses_nothing(server: ServerInfo) -> None:
    assert server.tcp_port is not None
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = Proxy(server.tcp_port)
            await nursery.start(proxy.run)
            async with open_users(server, ("tcp", "msgpack")) as users:
                alice = await users.open(
                    "alice",
                    port=proxy.port,
                    heartbeat=0.3,
                    pong_timeout=0.5,
                    reconnect_delays=(0.0, 0.1),
                )
                bob = await users.open("bob", transport="ws")
                ra = users.rec(alice)
                await befriend(alice, bob)
                conv = "d:alice:bob"
                first = await bob.send("alice", "before")
                await ra.message(conv, first.seq)

                proxy.freeze()  # the network to alice goes dead
                results: list[Any] = []
                sent_done = trio.Event()

                async def alice_sends() -> None:
                    results.append(await alice.send("bob", "during", cid="during-1"))
                    sent_done.set()

                nursery.start_soon(alice_sends)
                for i in range(5):
                    await bob.send("alice", f"while frozen {i}")
                # The client notices, reconnects, resends, catches up.
                await ra.push("connected", reconnect=True)
                await ra.wait_until(lambda: len(ra.messages(conv)) >= 7)
                with trio.fail_after(10):
                    await sent_done.wait()
                assert alice.heartbeat_failures >= 1
                assert alice.reconnects >= 1
                assert proxy.accepted >= 2
                assert ra.pushes("disconnected")
                [sent] = results
                history = (await alice.history(conv)).msgs
                assert [m.seq for m in history] == list(range(1, 8))
                mine = [m for m in history if m.cid == "during-1"]
                assert [(m.mid, m.seq) for m in mine] == [(sent.mid, sent.seq)]
                await alice.ping()
                seen = ra.messages(conv)
                assert [(m.seq, m.mid) for m in seen] == [(m.seq, m.mid) for m in history]
            nursery.cancel_scope.cancel()


async def test_slow_application_recovers_every_message(server: ServerInfo) -> None:
    """An application that stops reading overflows the bounded queues: pushes
    are dropped, then the messages come back through sync/history, once each,
    in order, with a ``resync`` event."""
    with trio.fail_after(30):
        async with open_users(server, ("tcp", "msgpack")) as users:
            alice = await users.open("alice", max_events=4, record=False)
            bob = await users.open("bob")
            await befriend(alice, bob)
            conv = "d:alice:bob"
            n = 40
            last = None
            for i in range(n):
                last = await bob.send("alice", f"m{i}")
            assert last is not None and last.seq == n
            await alice.ping()  # the pushes have reached alice's client
            rec = Recorder(alice)
            users.nursery.start_soon(rec.run)
            await rec.message(conv, n)
            assert [m.seq for m in rec.messages(conv)] == list(range(1, n + 1))
            assert [m.body for m in rec.messages(conv)] == [f"m{i}" for i in range(n)]
            resync = await rec.push("resync")
            assert resync["dropped_pushes"] == alice.dropped_pushes


async def test_replaced_device_stops_for_good(server: ServerInfo) -> None:
    with trio.fail_after(30):
        async with open_users(server, ("ws", "msgpack")) as users:
            first = await users.open("alice", device="phone", reconnect_delays=(0.0,))
            await users.open("alice", device="phone", register=False)
            rec = users.rec(first)
            await rec.push("kicked", reason="replaced")
            await rec.wait_until(lambda: rec.ended)
            assert first.closed_reason == "replaced"
            with pytest.raises(ClientClosed) as e:
                await first.sync()
            assert e.value.reason == "replaced"
            assert first.reconnects == 0


async def test_graceful_restart_is_survived(db_dsn: str) -> None:
    """The server stops (``kicked: shutdown``) and starts again on the same
    ports and database: the clients stay open, a send made while it is down
    completes, and the peer sees everything once."""
    cfg = test_config(
        tcp={"port": free_port()},
        websocket={"port": free_port()},
        chat={"require_friendship": False},
    )
    fast = {"reconnect_delays": (0.0, 0.1, 0.2)}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with running_server(cfg, db_dsn) as info:
                assert info.tcp_port is not None and info.ws_port is not None
                users = Users(nursery, ("tcp", "msgpack"), info.tcp_port, info.ws_port)
                alice = await users.open("alice", transport="ws", **fast)
                bob = await users.open("bob", **fast)
                ra = users.rec(alice)
                for i in range(3):
                    await bob.send("alice", f"before {i}")
                await ra.message("d:alice:bob", 3)
            # The server is gone: both were told, neither gave up.
            await ra.push("kicked", reason="shutdown")
            await users.rec(bob).push("kicked", reason="shutdown")
            assert alice.closed_reason is None and bob.closed_reason is None
            results: list[Any] = []
            done = trio.Event()

            async def send_while_down() -> None:
                results.append(await bob.send("alice", "while down"))
                done.set()

            nursery.start_soon(send_while_down)
            async with running_server(cfg, db_dsn):
                with trio.fail_after(20):
                    await done.wait()
                [r] = results
                assert r.seq == 4
                m = await ra.message("d:alice:bob", 4)
                assert m.body == "while down"
                await alice.ping()
                assert [x.seq for x in ra.messages("d:alice:bob")] == [1, 2, 3, 4]
                assert alice.reconnects >= 1 and bob.reconnects >= 1
                await users.aclose()
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------- fake server


class FakeServer:
    """An in-memory server: answers auth, ping, sync, history and send."""

    def __init__(self) -> None:
        self.transports: list[FakeTransport] = []
        self.mute: set[int] = set()  # connections that answer only auth
        self.refuse = False
        self.attempts: list[float] = []
        self.changed = trio.Event()
        self.stored: dict[str, dict[str, Any]] = {}
        self.mids = itertools.count(100)
        self.after_auth: list[dict[str, Any]] = []  # pushed right after the auth reply
        self.convs: list[dict[str, Any]] = []  # the sync reply
        self.history: dict[str, list[dict[str, Any]]] = {}

    async def open(self, nursery: trio.Nursery, host: str, port: int, **kw: Any) -> FakeTransport:
        self.attempts.append(trio.current_time())
        self._bump()
        if self.refuse:
            raise OSError("connection refused")
        t = FakeTransport(self, len(self.transports))
        self.transports.append(t)
        return t

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, pred: Any) -> None:
        while not pred():
            await self.changed.wait()


class FakeTransport:
    def __init__(self, server: FakeServer, index: int) -> None:
        self.server = server
        self.index = index
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self._send, self._recv = trio.open_memory_channel[dict[str, Any]](100)

    async def send(self, frame: dict[str, Any]) -> None:
        self.frames.append((trio.current_time(), frame))
        self.server._bump()
        op, rid = frame["op"], frame.get("rid")
        if op in ("login", "register", "auth"):
            reply = {"user": "alice", "device": "default", "heartbeat": 30, "server_time": 0}
            if op != "auth":
                reply["token"] = "tok"
            self._send.send_nowait({"op": "ok", "rid": rid, **reply})
            for push in self.server.after_auth:
                self._send.send_nowait(push)
            return
        if self.index in self.server.mute:
            return
        if op == "ping":
            self._send.send_nowait({"op": "pong", "rid": rid})
        elif op == "sync":
            self._send.send_nowait({"op": "ok", "rid": rid, "convs": self.server.convs})
        elif op == "history":
            after, limit = frame.get("after_seq", 0), frame.get("limit", 50)
            entries = [m for m in self.server.history.get(frame["conv"], []) if m["seq"] > after]
            page = entries[:limit]
            more = len(entries) > limit
            self._send.send_nowait({"op": "ok", "rid": rid, "msgs": page, "more": more})
        elif op == "send":
            row = self.server.stored.setdefault(
                frame["cid"],
                {"mid": next(self.server.mids), "conv": "d:alice:bob", "ts": 1},
            )
            row.setdefault("seq", len(self.server.stored))
            self._send.send_nowait({"op": "ok", "rid": rid, **row})

    async def receive(self) -> dict[str, Any]:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed("closed") from None

    async def aclose(self) -> None:
        self._send.close()
        self._recv.close()

    def ops(self) -> list[str]:
        return [f["op"] for _, f in self.frames]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeServer:
    server = FakeServer()
    monkeypatch.setattr(client_module, "open_transport", server.open)
    return server


async def test_ping_period_pong_timeout_and_resend(
    autojump_clock: trio.testing.MockClock, fake: FakeServer
) -> None:
    """Ping every 30 s (the server's ``heartbeat``); no pong within 10 s means
    reconnect at once; the unacknowledged send goes out again, same cid."""
    async with trio.open_nursery() as nursery:
        c = Client("127.0.0.1", 1)
        await c.start(nursery)
        t0 = trio.current_time()
        await c.login("alice", "password1")
        fake.mute.add(0)  # from now on connection 0 answers nothing
        results = []

        async def send() -> None:
            results.append(await c.send("bob", "hi", cid="c1"))

        nursery.start_soon(send)
        await fake.wait(lambda: len(fake.transports) == 2)
        first, second = fake.transports
        pings = [t for t, f in first.frames if f["op"] == "ping"]
        assert pings == [pytest.approx(t0 + 30)]
        assert fake.attempts[1] == pytest.approx(t0 + 40)  # pong timeout, then delay 0
        await fake.wait(lambda: bool(results))
        [r] = results
        assert (r.cid, r.seq) == ("c1", 1)
        sends = [f for _, f in first.frames + second.frames if f["op"] == "send"]
        assert [f["cid"] for f in sends] == ["c1", "c1"]
        assert second.frames[0][1]["op"] == "auth"
        assert second.frames[0][1]["token"] == "tok"
        assert c.heartbeat_failures == 1
        assert c.reconnects == 1
        # A healthy connection is pinged every 30 s and kept.
        await trio.sleep(100)
        assert len(fake.transports) == 2
        pings = [t for t, f in second.frames if f["op"] == "ping"]
        assert len(pings) == 3
        assert [b - a for a, b in itertools.pairwise(pings)] == [
            pytest.approx(30),
            pytest.approx(30),
        ]
        await c.aclose()


async def test_reconnect_schedule(autojump_clock: trio.testing.MockClock, fake: FakeServer) -> None:
    """Attempts after 0, 2, 5, 10, then every 30 s; login reports the failure."""
    fake.refuse = True
    async with trio.open_nursery() as nursery:
        c = Client("127.0.0.1", 1)
        await c.start(nursery)
        with pytest.raises(ConnectionLost, match="connection refused"):
            await c.login("alice", "password1")
        await fake.wait(lambda: len(fake.attempts) >= 7)
        gaps = [b - a for a, b in itertools.pairwise(fake.attempts)]
        assert gaps == [pytest.approx(x) for x in (0, 2, 5, 10, 30, 30)]
        # The server comes back: the next attempt connects and login works.
        fake.refuse = False
        await fake.wait(lambda: len(fake.transports) == 1)
        await c.login("alice", "password1")
        assert c.connected
        await c.aclose()


async def test_shortened_schedule_is_a_parameter(
    autojump_clock: trio.testing.MockClock, fake: FakeServer
) -> None:
    fake.refuse = True
    async with trio.open_nursery() as nursery:
        c = Client("127.0.0.1", 1, reconnect_delays=(0.1, 0.25))
        await c.start(nursery)
        await fake.wait(lambda: len(fake.attempts) >= 5)
        gaps = [b - a for a, b in itertools.pairwise(fake.attempts)]
        assert gaps[:4] == [pytest.approx(x) for x in (0.1, 0.25, 0.25, 0.25)]
        await c.aclose()


def test_message_from_history_entry() -> None:
    m = Message.from_frame({"mid": 5, "conv": "d:a:b", "seq": 2, "from": "a", "kind": "text"})
    assert (m.body, m.cid, m.recalled, m.sender) == ("", None, False, "a")


def _msg(conv: str, seq: int, body: str = "") -> dict[str, Any]:
    return {
        "mid": 1000 + seq,
        "conv": conv,
        "seq": seq,
        "from": "bob",
        "kind": "text",
        "body": body or f"{conv}#{seq}",
        "ts": 1,
    }


async def test_baseline_keeps_what_arrived_after_auth(
    autojump_clock: trio.testing.MockClock, fake: FakeServer
) -> None:
    """The first sync sets where the application starts: what was pushed after
    authentication is delivered (even though the sync already counts it), older
    entries are not; a conversation created later is delivered from seq 1; a gap
    is filled from history."""
    fake.convs = [{"conv": "d:alice:bob", "last_seq": 5}, {"conv": "g:1", "last_seq": 9}]
    fake.after_auth = [{"op": "msg", **_msg("d:alice:bob", 5)}]
    fake.history = {
        "d:alice:bob": [_msg("d:alice:bob", i) for i in range(1, 9)],
        "d:alice:carol": [_msg("d:alice:carol", i) for i in (1, 2)],
    }
    async with trio.open_nursery() as nursery:
        c = Client("127.0.0.1", 1)
        await c.start(nursery)
        await c.login("alice", "password1")
        rec = Recorder(c)
        nursery.start_soon(rec.run)
        m = await rec.message("d:alice:bob", 5)
        assert (m.mid, m.body) == (1005, "d:alice:bob#5")
        conn = fake.transports[0]
        # Live pushes: a new conversation (filled from 1), a gap (6 missing).
        await conn._send.send({"op": "msg", **_msg("d:alice:carol", 2)})
        await conn._send.send({"op": "msg", **_msg("d:alice:bob", 7)})
        await rec.message("d:alice:bob", 7)
        await rec.message("d:alice:carol", 2)
        got = [(x.conv, x.seq) for x in rec.messages()]
        assert sorted(got) == [
            ("d:alice:bob", 5),
            ("d:alice:bob", 6),
            ("d:alice:bob", 7),
            ("d:alice:carol", 1),
            ("d:alice:carol", 2),
        ]
        assert c.cursors == {"d:alice:bob": 7, "d:alice:carol": 2, "g:1": 9}
        await c.aclose()
