"""The client library against the real server: chat over every transport."""

from __future__ import annotations

import pytest
import trio

from clients import Message
from imserver.app import ServerInfo

from .client_helpers import KIND_IDS, KINDS, befriend, open_users


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
async def test_chat_between_two_clients(server: ServerInfo, kind: tuple[str, str]) -> None:
    with trio.fail_after(30):
        async with open_users(server, kind) as users:
            alice = await users.open("alice")
            bob = await users.open("bob")
            await befriend(alice, bob)
            conv = "d:alice:bob"
            sent = await alice.send("bob", "hi bob")
            assert (sent.conv, sent.seq) == (conv, 1)
            m = await users.rec(bob).message(conv, 1)
            assert (m.mid, m.sender, m.body, m.kind, m.ts) == (
                sent.mid,
                "alice",
                "hi bob",
                "text",
                sent.ts,
            )
            assert m.cid is None  # only the sender's own devices see the cid
            reply = await bob.send(conv=conv, body="hi alice", reply_to=sent.mid)
            assert reply.seq == 2
            got = await users.rec(alice).message(conv, 2)
            assert (got.sender, got.body, got.reply_to) == ("bob", "hi alice", sent.mid)
            # The sender's own message is an event too, once, in seq order.
            assert [(x.seq, x.sender) for x in users.rec(alice).messages(conv)] == [
                (1, "alice"),
                (2, "bob"),
            ]
            assert users.rec(alice).messages(conv)[0].cid == sent.cid
            assert [(x.seq, x.body) for x in users.rec(bob).messages(conv)] == [
                (1, "hi bob"),
                (2, "hi alice"),
            ]
            # Both sides see the same history.
            h = await bob.history(conv)
            assert [(x.seq, x.mid, x.body) for x in h.msgs] == [
                (1, sent.mid, "hi bob"),
                (2, reply.mid, "hi alice"),
            ]
            assert h.more is False
            assert isinstance(h.msgs[0], Message)
