"""Catch-up (acceptance 4): 1,000 messages while offline, then sync + history paging."""

from __future__ import annotations

import pytest
import trio

from imserver.config import Config

from .conftest import Clients, befriend, test_config


@pytest.fixture
def config() -> Config:
    return test_config(rate={"send_per_s": 1e6, "send_burst": 1_000_000})


async def test_offline_user_catches_up_in_order(clients: Clients) -> None:
    with trio.fail_after(60):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws")
        await befriend(alice, bob)
        await bob.aclose()
        # 1,000 messages pipelined (no waiting for each reply), then collect the acks.
        for i in range(1000):
            await alice.send_frame(
                {"op": "send", "rid": 10_000 + i, "to": "bob", "cid": f"m{i}", "body": f"n{i}"}
            )
        acks = {}
        while len(acks) < 1000:
            f = await alice.recv_frame()
            if f["op"] == "presence":
                continue
            assert f["op"] == "ok", f
            acks[f["rid"] - 10_000] = f["seq"]
        assert sorted(acks.values()) == list(range(1, 1001))
        assert [acks[i] for i in range(1000)] == list(range(1, 1001))  # send order = seq order

        bob = await clients.connect("ws-json")
        await bob.ok("login", user="bob", password="password1")
        (conv,) = (await bob.ok("sync"))["convs"]
        assert conv["unread"] == 1000 and conv["last_seq"] == 1000 and conv["read_seq"] == 0
        got = []
        after = 0
        while True:
            page = await bob.ok("history", conv=conv["conv"], after_seq=after, limit=200)
            got.extend(page["msgs"])
            if not page["more"]:
                break
            after = page["msgs"][-1]["seq"]
        assert [m["seq"] for m in got] == list(range(1, 1001))
        assert [m["body"] for m in got] == [f"n{i}" for i in range(1000)]
        # Paging backwards gives the same set.
        back = []
        before = None
        while True:
            args = {"before_seq": before} if before else {}
            page = await bob.ok("history", conv=conv["conv"], limit=150, **args)
            back = page["msgs"] + back
            if not page["more"]:
                break
            before = page["msgs"][0]["seq"]
        assert [m["seq"] for m in back] == list(range(1, 1001))

        await bob.ok("read", conv=conv["conv"], seq=600)
        (conv,) = (await bob.ok("sync"))["convs"]
        assert conv["unread"] == 400 and conv["read_seq"] == 600
        await bob.ok("read", conv=conv["conv"], seq=5000)  # clamped to last_seq
        (conv,) = (await bob.ok("sync"))["convs"]
        assert conv["unread"] == 0 and conv["read_seq"] == 1000
        # The sender's own messages never count as unread for the sender.
        (aconv,) = (await alice.ok("sync"))["convs"]
        assert aconv["unread"] == 0
