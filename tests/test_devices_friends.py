"""Devices, logout, friends, blocks, presence, typing and receipts over real sockets."""

from __future__ import annotations

import trio

from .client import TestClient
from .conftest import Clients, befriend


async def test_same_device_replaces_and_fourth_device_kicks_oldest(clients: Clients) -> None:
    with trio.fail_after(20):
        first = await clients.user("alice", "ws", device="phone")
        again = await clients.connect("tcp")
        await again.ok("login", user="alice", password="password1", device="phone")
        frames, code = await first.closed()
        assert frames[-1] == {"op": "kicked", "reason": "replaced"}
        assert code == 4001
        laptop = await clients.connect("ws")
        await laptop.ok("login", user="alice", password="password1", device="laptop")
        tablet = await clients.connect("tcp")
        await tablet.ok("login", user="alice", password="password1", device="tablet")
        # A fourth device kicks the oldest one still connected ("phone" on TCP).
        desk = await clients.connect("tcp")
        await desk.ok("login", user="alice", password="password1", device="desk")
        frames, _ = await again.closed()
        assert frames[-1] == {"op": "kicked", "reason": "too_many_devices"}
        hub = clients.info.state.hub
        assert sorted(c.device for c in hub.devices("alice")) == ["desk", "laptop", "tablet"]
        await laptop.ok("ping")


async def test_logout_revokes_the_token_everywhere(clients: Clients) -> None:
    with trio.fail_after(20):
        a = await clients.user("alice", device="one")
        b = await clients.connect("ws")
        await b.ok("auth", token=a.token, device="two")
        reply = await a.request("logout")
        assert reply["op"] == "ok"
        frames, _ = await a.closed()
        assert frames == []
        frames, code = await b.closed()
        assert frames[-1] == {"op": "kicked", "reason": "revoked"}
        assert code == 4004
        c = await clients.connect("tcp")
        r = await c.request("auth", token=a.token)
        assert r["code"] == "unauthorized"


async def test_friend_flow_requests_reject_remove(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws-json")
        r = await alice.ok("friend_request", to="bob", note="hello")
        assert r["result"] == "requested"
        push = await bob.push("friend")
        assert push == {"op": "friend", "event": "request", "user": "alice", "note": "hello"}
        reqs = (await bob.ok("friend_requests"))["requests"]
        assert [(q["user"], q["direction"], q["note"]) for q in reqs] == [("alice", "in", "hello")]
        out = (await alice.ok("friend_requests"))["requests"]
        assert [(q["user"], q["direction"]) for q in out] == [("bob", "out")]
        r = await bob.ok("friend_reject", user="alice")
        assert r["result"] == "rejected"
        assert (await alice.push("friend"))["event"] == "rejected"
        assert (await bob.request("friend_accept", user="alice"))["code"] == "not_found"
        assert (await alice.request("friend_request", to="nobody"))["code"] == "not_found"
        assert (await alice.request("friend_request", to="alice"))["code"] == "invalid"
        await befriend(alice, bob)
        assert (await alice.request("friend_request", to="bob"))["code"] == "conflict"
        friends = (await alice.ok("friends"))["friends"]
        assert friends == [{"user": "bob", "status": "online", "last_seen": None}]
        r = await bob.ok("friend_remove", user="alice")
        assert r["result"] == "removed"
        assert (await alice.push("friend"))["event"] == "removed"
        assert (await alice.ok("friends"))["friends"] == []
        assert (await alice.request("send", to="bob", cid="x", body="hi"))["code"] == "forbidden"


async def test_crossed_requests_make_friends(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        await alice.ok("friend_request", to="bob")
        r = await bob.ok("friend_request", to="alice")
        assert r["result"] == "accepted"
        assert (await alice.push("friend"))["event"] == "accepted"
        await alice.ok("send", to="bob", cid="1", body="now friends")


async def test_presence_pushes_queries_and_blocks(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws")
        carol = await clients.user("carol")
        await befriend(alice, bob)
        await bob.ok("presence", status="busy")
        p = await alice.push("presence")
        while p["status"] != "busy":
            p = await alice.push("presence")
        assert p == {"op": "presence", "user": "bob", "status": "busy", "last_seen": None}
        q = await alice.ok("presence_query", users=["bob", "carol", "nobody"])
        assert q["presence"] == [{"user": "bob", "status": "busy", "last_seen": None}]
        # Offline: friends are told, with last_seen.
        await bob.aclose()
        p = await alice.push("presence")
        while p["status"] != "offline":
            p = await alice.push("presence")
        assert p["user"] == "bob" and isinstance(p["last_seen"], int)
        # A block hides presence both ways, and typing is refused.
        bob = await clients.connect("tcp")
        await bob.ok("login", user="bob", password="password1")
        await alice.ok("block", user="bob")
        assert (await alice.ok("presence_query", users=["bob"]))["presence"] == []
        assert (await bob.ok("presence_query", users=["alice"]))["presence"] == []
        assert (await alice.ok("friends"))["friends"] == [{"user": "bob", "blocked": True}]
        assert (await bob.request("typing", to="alice", on=True))["code"] == "forbidden"
        assert (await bob.request("friend_request", to="alice"))["code"] in (
            "forbidden",
            "conflict",
        )
        # carol never sees alice's presence (not friends).
        await carol.ok("ping")
        assert not [f for f in carol.pushes if f["op"] == "presence"]


async def test_typing_and_delivery_receipts(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws-json")
        bob2 = await clients.connect("ws")
        await bob2.ok("login", user="bob", password="password1", device="tablet")
        await befriend(alice, bob)
        await alice.ok("typing", to="bob", on=True)
        t = await bob.push("typing")
        assert t == {"op": "typing", "conv": "d:alice:bob", "user": "alice", "on": True}
        assert (await bob2.push("typing"))["on"] is True
        sent = await alice.ok("send", to="bob", cid="m1", body="hi")
        await bob.push("msg")
        await bob.send_frame({"op": "recv", "conv": sent["conv"], "seq": sent["seq"]})
        r = await alice.push("receipt")
        assert r == {"op": "receipt", "conv": "d:alice:bob", "user": "bob", "delivered": 1}
        await bob.ok("read", conv=sent["conv"], seq=1)
        assert (await alice.push("receipt"))["read"] == 1
        # The reader's other device learns of the read.
        assert await bob2.push("read") == {"op": "read", "conv": "d:alice:bob", "seq": 1}


async def test_server_shutdown_says_goodbye(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice", "ws")
        bob = await clients.user("bob")
        clients.info.shutdown()
        frames, code = await alice.closed()
        assert frames[-1] == {"op": "kicked", "reason": "shutdown"}
        assert code == 4005
        frames, _ = await bob.closed()
        assert frames[-1] == {"op": "kicked", "reason": "shutdown"}


__all__ = ["TestClient"]
