"""Every request helper of the client library round-trips against the real server.

Also: the pushes they cause arrive as typed events, and the entries made by
the client's own ``send``, ``recall`` and group operations (for which the
requesting connection gets a reply instead of a ``msg`` push) still appear
in its event stream exactly once, in seq order.
"""

from __future__ import annotations

import pytest
import trio

from clients import ClientClosed, Forbidden, Message
from imserver.app import ServerInfo

from .client_helpers import open_users


def seqs(msgs: list[Message]) -> list[int]:
    return [m.seq for m in msgs]


async def test_every_helper_round_trips(server: ServerInfo) -> None:
    with trio.fail_after(60):
        async with open_users(server, ("tcp", "msgpack")) as users:
            alice = await users.open("alice")
            bob = await users.open("bob")
            carol = await users.open("carol", transport="ws", encoding="json")
            ra, rb, rc = users.rec(alice), users.rec(bob), users.rec(carol)
            assert await alice.ping() >= 0

            # Friends (§8).
            assert await alice.friend_request("bob", "hi") == "requested"
            p = await rb.push("friend", event="request", user="alice")
            assert p["note"] == "hi"
            reqs = await bob.friend_requests()
            assert [(r["user"], r["direction"], r["note"]) for r in reqs] == [("alice", "in", "hi")]
            assert await bob.friend_accept("alice") == "accepted"
            await ra.push("friend", event="accepted", user="bob")
            assert await carol.friend_request("alice") == "requested"
            assert await alice.friend_reject("carol") == "rejected"
            await rc.push("friend", event="rejected", user="alice")
            assert await alice.friend_requests() == []
            friends = await alice.friends()
            assert [(f["user"], f["status"]) for f in friends] == [("bob", "online")]

            # Presence.
            await bob.presence("away")
            await ra.push("presence", user="bob", status="away")
            pq = await alice.presence_query(["bob", "carol"])
            assert [(x["user"], x["status"]) for x in pq] == [("bob", "away")]

            # Typing, send, recv/read receipts, sync (§5-7).
            conv = "d:alice:bob"
            await alice.typing("bob", on=True)
            await rb.push("typing", conv=conv, user="alice", on=True)
            s1 = await alice.send("bob", "one")
            s2 = await alice.send("bob", "two", meta={"x": 1})
            assert (s1.seq, s2.seq) == (1, 2)
            m2 = await rb.message(conv, 2)
            assert m2.meta == {"x": 1}
            await bob.recv(conv, 2)
            await ra.push("receipt", conv=conv, user="bob", delivered=2)
            [entry] = [c for c in await bob.sync() if c["conv"] == conv]
            assert (entry["unread"], entry["last_seq"], entry["title"]) == (2, 2, "alice")
            await bob.read(conv, 1)
            await ra.push("receipt", conv=conv, user="bob", read=1)
            [entry] = [c for c in await bob.sync() if c["conv"] == conv]
            assert (entry["unread"], entry["read_seq"]) == (1, 1)

            # conv_set, delete, recall.
            r = await bob.conv_set(conv, pinned=True)
            assert (r["conv"], r["pinned"], r["muted"]) == (conv, True, False)
            r = await bob.conv_set(conv, muted=True)
            assert (r["pinned"], r["muted"]) == (True, True)
            await bob.delete(s1.mid)
            assert seqs((await bob.history(conv)).msgs) == [2]
            assert seqs((await alice.history(conv)).msgs) == [1, 2]
            r = await alice.recall(s2.mid)
            assert (r["conv"], r["seq"]) == (conv, 3)
            await rb.push("recalled", conv=conv, mid=s2.mid, seq=2, by="alice")
            recall_entry = await rb.message(conv, 3)
            assert (recall_entry.kind, recall_entry.meta) == ("recall", {"mid": s2.mid})
            # Alice got a reply, not a push, for her recall entry: the client
            # fetched it, so her stream is still 1, 2, 3.
            mine = await ra.message(conv, 3)
            assert mine.kind == "recall"
            assert seqs(ra.messages(conv)) == [1, 2, 3]
            h = await alice.history(conv, before_seq=3, limit=1)
            assert (seqs(h.msgs), h.msgs[0].recalled, h.more) == ([2], True, True)
            h = await alice.history(conv, after_seq=1)
            assert seqs(h.msgs) == [2, 3]

            # Groups (§8, §11).
            g = await alice.group_create("team", ["bob", "carol"])
            gid, gconv = g["group"], g["conv"]
            assert gconv == f"g:{gid}"
            created = await rc.message(gconv, 1)
            assert (created.kind, created.meta and created.meta["event"]) == ("system", "created")
            info = await bob.group_info(gid)
            assert info["owner"] == "alice"
            assert [m["user"] for m in info["members"]] == ["alice", "bob", "carol"]
            await alice.group_update(gid, name="team2")
            await alice.group_role(gid, "bob", "admin")
            [listed] = await carol.groups()
            assert (listed["group"], listed["name"], listed["members"]) == (gid, "team2", 3)
            sent = await bob.send(group=gid, body="hello @carol", mentions=["carol"])
            got = await rc.message(gconv, sent.seq)
            assert (got.body, got.mentions) == ("hello @carol", ["carol"])
            await alice.typing(group=gid, on=True)
            await rc.push("typing", conv=gconv, user="alice", on=True)
            assert (await alice.group_remove(gid, ["carol"]))["removed"] == ["carol"]
            await rc.push("group", event="removed", group=gid)
            assert (await bob.group_add(gid, ["carol"]))["added"] == ["carol"]
            await carol.group_leave(gid)
            d = await alice.group_dissolve(gid)
            assert (await alice.group_info(gid))["dissolved"] is True
            # Every entry of the group, own ones included, once and in order.
            await ra.message(gconv, d["seq"])
            assert seqs(ra.messages(gconv)) == list(range(1, d["seq"] + 1))
            await rb.message(gconv, d["seq"])
            assert seqs(rb.messages(gconv)) == list(range(1, d["seq"] + 1))

            # Notices.
            notice = await server.state.notices.create("security", "New login", "x", ["alice"])
            await ra.push("notice", id=notice["id"])
            assert [n["id"] for n in await alice.notices()] == [notice["id"]]
            await alice.notice_read(notice["id"])
            assert await alice.notices() == []

            # Block, unblock, remove.
            assert await bob.block("alice") == "blocked"
            with pytest.raises(Forbidden):
                await alice.send("bob", "blocked?")
            assert await bob.unblock("alice") == "unblocked"
            assert await alice.friend_remove("bob") == "removed"
            await rb.push("friend", event="removed", user="alice")
            assert await alice.friends() == []

            # Logout closes the client for good.
            await carol.logout()
            assert carol.closed_reason == "logout"
            with pytest.raises(ClientClosed):
                await carol.sync()
            await rc.wait_until(lambda: rc.ended)
