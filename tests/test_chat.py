"""Direct chat end to end: real server, real PostgreSQL, real sockets (acceptance 1)."""

from __future__ import annotations

import pytest
import trio

from .conftest import Clients, befriend

KINDS = ["tcp", "ws", "ws-json"]


@pytest.mark.parametrize(
    ("kind_a", "kind_b"), [("tcp", "tcp"), ("ws", "ws-json"), ("tcp", "ws"), ("ws-json", "tcp")]
)
async def test_two_users_chat_both_ways(clients: Clients, kind_a: str, kind_b: str) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice", kind_a)
        bob = await clients.user("bob", kind_b)
        await befriend(alice, bob)
        sent = []
        for i in range(5):
            r = await alice.ok("send", to="bob", cid=f"a{i}", body=f"hello {i}")
            sent.append(r)
            r = await bob.ok("send", to="alice", cid=f"b{i}", body=f"hi {i}")
            sent.append(r)
        seqs = [r["seq"] for r in sent]
        assert seqs == list(range(1, 11))
        assert all(r["conv"] == "d:alice:bob" for r in sent)
        got_bob = [await bob.push("msg") for _ in range(5)]
        got_alice = [await alice.push("msg") for _ in range(5)]
        assert [m["body"] for m in got_bob] == [f"hello {i}" for i in range(5)]
        assert [m["seq"] for m in got_bob] == [1, 3, 5, 7, 9]
        assert [m["seq"] for m in got_alice] == [2, 4, 6, 8, 10]
        assert all(m["from"] == "alice" and "cid" not in m for m in got_bob)


async def test_other_devices_of_sender_get_the_message_with_cid(clients: Clients) -> None:
    with trio.fail_after(20):
        a1 = await clients.user("alice", "tcp", device="phone")
        a2 = await clients.connect("ws")
        await a2.ok("login", user="alice", password="password1", device="laptop")
        bob = await clients.user("bob", "ws-json")
        await befriend(a1, bob)
        r = await a1.ok("send", to="bob", cid="x1", body="hey")
        m2 = await a2.push("msg")
        mb = await bob.push("msg")
        assert m2["cid"] == "x1" and m2["seq"] == r["seq"] == mb["seq"] == 1
        assert "cid" not in mb
        # The sending connection got the ok reply, not a push.
        await a1.ok("ping")
        assert not [p for p in a1.pushes if p["op"] == "msg"]


async def test_send_requires_friendship_and_respects_blocks(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        r = await alice.request("send", to="bob", cid="1", body="x")
        assert r["code"] == "forbidden"
        r = await alice.request("send", to="nobody", cid="2", body="x")
        assert r["code"] == "forbidden"
        await befriend(alice, bob)
        await bob.ok("block", user="alice")
        r = await alice.request("send", to="bob", cid="3", body="x")
        assert r["code"] == "forbidden"
        r = await bob.request("send", to="alice", cid="4", body="x")
        assert r["code"] == "forbidden"
        await bob.ok("unblock", user="alice")
        r = await alice.ok("send", to="bob", cid="5", body="back")
        assert r["seq"] == 1


async def test_sync_history_read_unread(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws")
        await befriend(alice, bob)
        for i in range(7):
            await alice.ok("send", to="bob", cid=f"c{i}", body=f"m{i}")
        s = await bob.ok("sync")
        (conv,) = s["convs"]
        assert conv["conv"] == "d:alice:bob" and conv["title"] == "alice"
        assert conv["kind"] == "direct" and conv["last_seq"] == 7 and conv["unread"] == 7
        assert conv["last_msg"]["body"] == "m6" and conv["read_seq"] == 0
        s = await alice.ok("sync")
        assert s["convs"][0]["unread"] == 0 and s["convs"][0]["title"] == "bob"
        h = await bob.ok("history", conv="d:alice:bob", after_seq=2, limit=3)
        assert [m["seq"] for m in h["msgs"]] == [3, 4, 5] and h["more"] is True
        h = await bob.ok("history", conv="d:alice:bob", before_seq=3)
        assert [m["seq"] for m in h["msgs"]] == [1, 2] and h["more"] is False
        h = await bob.ok("history", conv="d:alice:bob", limit=2)
        assert [m["seq"] for m in h["msgs"]] == [6, 7] and h["more"] is True
        await bob.ok("read", conv="d:alice:bob", seq=5)
        receipt = await alice.push("receipt")
        assert receipt == {"op": "receipt", "conv": "d:alice:bob", "user": "bob", "read": 5}
        s = await bob.ok("sync")
        assert s["convs"][0]["unread"] == 2 and s["convs"][0]["read_seq"] == 5
        await bob.ok("read", conv="d:alice:bob", seq=3)  # lower: ok, no change
        s = await bob.ok("sync")
        assert s["convs"][0]["read_seq"] == 5
        r = await clients.user("carol")
        reply = await r.request("history", conv="d:alice:bob")
        assert reply["code"] == "forbidden"
