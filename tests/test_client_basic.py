"""The client library against the real server: chat over every transport."""

from __future__ import annotations

import pytest
import trio

from clients import ClientClosed, Message, Push, RequestTimeout, open_client
from imserver.app import ServerInfo

from .client_helpers import KIND_IDS, KINDS, PASSWORD, befriend, open_users


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


async def test_open_client_with_password_then_token(server: ServerInfo) -> None:
    """open_client logs in (or registers) on entry and closes on exit; a token
    from one session authenticates another (``auth``)."""
    assert server.ws_port is not None and server.tcp_port is not None
    with trio.fail_after(30):
        async with open_client(
            "127.0.0.1",
            server.ws_port,
            transport="ws",
            encoding="json",
            user="carol",
            password=PASSWORD,
            register=True,
        ) as carol:
            assert carol.user == "carol"
            assert carol.token
            assert carol.connected
            token = carol.token
            first = await carol.next_event(timeout=5)
            assert isinstance(first, Push)
            assert (first.op, first["reconnect"]) == ("connected", False)
            with pytest.raises(RequestTimeout):
                await carol.next_event(timeout=0.2)
        assert carol.closed_reason == "closed"
        with pytest.raises(ClientClosed):
            await carol.sync()
        async with open_client("127.0.0.1", server.tcp_port, token=token, device="second") as again:
            assert again.user == "carol"
            assert again.session["device"] == "second"
            assert await again.sync() == []
