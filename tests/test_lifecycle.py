"""Recall, delete, pin/mute and notices end to end (issue 3, acceptance 4-5).

Real server, real PostgreSQL, real sockets; restarts are a second server on
the same database. The recall window under a MockClock is in test_timeouts.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
import trio

from imserver.app import ServerInfo
from imserver.config import Config
from protocol.errors import ErrorCode, OpError

from .client import TestClient
from .conftest import Clients, befriend, running_server, test_config


async def _fetchrow(dsn: str, sql: str, *args: Any) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchrow(sql, *args)
        finally:
            await conn.close()

    return await trio.to_thread.run_sync(lambda: asyncio.run(run()))


async def _client(
    info: ServerInfo,
    nursery: trio.Nursery,
    name: str,
    kind: str = "tcp",
    device: str = "default",
    register: bool = True,
) -> TestClient:
    if kind == "tcp":
        assert info.tcp_port is not None
        c = await TestClient.tcp(info.tcp_port)
    else:
        assert info.ws_port is not None
        c = await TestClient.ws(nursery, info.ws_port, text=kind == "ws-json")
    await c.login(name, device=device, register=register)
    return c


async def test_recall_pushed_erased_and_gone_after_restart(config: Config, db_dsn: str) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with running_server(config, db_dsn) as info:
                alice = await _client(info, nursery, "alice")
                alice2 = await _client(info, nursery, "alice", "ws", "tablet", register=False)
                bob = await _client(info, nursery, "bob", "ws-json")
                await befriend(alice, bob)
                sent = await alice.ok(
                    "send", to="bob", cid="oops", body="secret", meta={"url": "http://x"}
                )
                await bob.push("msg")
                await alice2.push("msg")
                r = await alice.ok("recall", mid=sent["mid"])
                assert r["seq"] == sent["seq"] + 1 and r["conv"] == sent["conv"]
                for c in (bob, alice2):
                    entry = await c.push("msg")
                    assert entry["kind"] == "recall" and entry["meta"] == {"mid": sent["mid"]}
                    assert entry["seq"] == r["seq"] and entry["from"] == "alice"
                    rec = await c.push("recalled")
                    assert rec == {
                        "op": "recalled",
                        "conv": sent["conv"],
                        "mid": sent["mid"],
                        "seq": sent["seq"],
                        "by": "alice",
                    }
                hist = await bob.ok("history", conv=sent["conv"])
                first = hist["msgs"][0]
                assert first["recalled"] is True and "body" not in first and "meta" not in first
                sync = (await bob.ok("sync"))["convs"][0]
                assert sync["last_msg"]["kind"] == "recall"
                assert sync["last_msg"]["meta"] == {"mid": sent["mid"]}
                assert sync["unread"] == 0  # neither the recalled message nor the recall counts
                err = await alice.request("recall", mid=sent["mid"])
                assert err["code"] == "conflict"
                for c in (alice, alice2, bob):
                    await c.aclose()
            row = await _fetchrow(
                db_dsn, "SELECT body, meta, recalled FROM messages WHERE mid = $1", sent["mid"]
            )
            assert row["body"] is None and row["meta"] is None and row["recalled"] is True
            async with running_server(config, db_dsn) as info:
                c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
                await c.login("bob", register=False)
                hist = await c.ok("history", conv=sent["conv"])
                assert hist["msgs"][0] == {
                    "mid": sent["mid"],
                    "conv": sent["conv"],
                    "seq": sent["seq"],
                    "from": "alice",
                    "kind": "text",
                    "ts": sent["ts"],
                    "recalled": True,
                }
                await c.aclose()
            row = await _fetchrow(
                db_dsn, "SELECT body, meta FROM messages WHERE mid = $1", sent["mid"]
            )
            assert row["body"] is None and row["meta"] is None
            nursery.cancel_scope.cancel()


async def test_recall_rules(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        eve = await clients.user("eve")
        await befriend(alice, bob)
        sent = await alice.ok("send", to="bob", cid="m1", body="hi")
        for who in (bob, eve):
            err = await who.request("recall", mid=sent["mid"])
            assert err["code"] == "forbidden", err
        err = await alice.request("recall", mid=10**12)
        assert err["code"] == "not_found"
        # The recall entry itself cannot be recalled.
        r = await alice.ok("recall", mid=sent["mid"])
        err = await alice.request("recall", mid=r["mid"])
        assert err["code"] == "forbidden"
        # Two recalls of one message pipelined: exactly one wins.
        s2 = await alice.ok("send", to="bob", cid="m2", body="again")
        for rid in (501, 502):
            await alice.send_frame({"op": "recall", "rid": rid, "mid": s2["mid"]})
        replies = []
        while len(replies) < 2:
            f = await alice.recv_frame()
            if f.get("rid") in (501, 502):
                replies.append(f)
        assert sorted(f["op"] for f in replies) == ["error", "ok"]
        assert next(f for f in replies if f["op"] == "error")["code"] == "conflict"


async def test_recall_in_group_reaches_offline_member_by_catching_up(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        carol = await clients.user("carol", "ws")
        g = await alice.ok("group_create", name="g", members=["bob", "carol"])
        sent = await bob.ok("send", group=g["group"], cid="b1", body="typo")
        await carol.aclose()
        r = await bob.ok("recall", mid=sent["mid"])
        # Alice (online) gets the entry and the recalled push.
        entry = await alice.push("msg")
        while entry["kind"] != "recall":
            entry = await alice.push("msg")
        assert entry["meta"] == {"mid": sent["mid"]} and entry["seq"] == r["seq"]
        assert (await alice.push("recalled"))["seq"] == sent["seq"]
        # Carol comes back and catches up from the last seq she had.
        carol = await clients.connect("tcp")
        await carol.login("carol", register=False)
        hist = await carol.ok("history", conv=g["conv"], after_seq=sent["seq"] - 1)
        assert [m["seq"] for m in hist["msgs"]] == [sent["seq"], r["seq"]]
        assert hist["msgs"][0]["recalled"] is True
        assert hist["msgs"][1]["kind"] == "recall"


async def test_delete_hides_for_one_user_only(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice", device="phone")
        alice2 = await clients.connect("ws")
        await alice2.login("alice", device="laptop", register=False)
        bob = await clients.user("bob")
        eve = await clients.user("eve")
        await befriend(alice, bob)
        m1 = await bob.ok("send", to="alice", cid="1", body="one")
        m2 = await bob.ok("send", to="alice", cid="2", body="two")
        await alice.ok("delete", mid=m2["mid"])
        d = await alice2.push("deleted")
        assert d == {"op": "deleted", "conv": m2["conv"], "mid": m2["mid"]}
        mine = await alice.ok("history", conv=m1["conv"])
        assert [m["mid"] for m in mine["msgs"]] == [m1["mid"]]
        theirs = await bob.ok("history", conv=m1["conv"])
        assert [m["mid"] for m in theirs["msgs"]] == [m1["mid"], m2["mid"]]
        sync = (await alice.ok("sync"))["convs"][0]
        assert sync["last_msg"]["mid"] == m1["mid"] and sync["unread"] == 1
        await alice.ok("delete", mid=m2["mid"])  # idempotent
        err = await eve.request("delete", mid=m1["mid"])
        assert err["code"] == "not_found"  # not visible to eve: nothing to hide
        err = await alice.request("delete", mid=10**12)
        assert err["code"] == "not_found"


async def test_pin_and_mute_persist_across_devices_and_restart(config: Config, db_dsn: str) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with running_server(config, db_dsn) as info:
                alice = await _client(info, nursery, "alice", device="phone")
                alice2 = await _client(info, nursery, "alice", "ws-json", "laptop", register=False)
                bob = await _client(info, nursery, "bob")
                carol = await _client(info, nursery, "carol")
                await befriend(alice, bob)
                await befriend(alice, carol)
                ab = await bob.ok("send", to="alice", cid="1", body="from bob")
                ac = await carol.ok("send", to="alice", cid="1", body="from carol")
                order = [e["conv"] for e in (await alice.ok("sync"))["convs"]]
                assert order == [ac["conv"], ab["conv"]]  # most recent first
                r = await alice.ok("conv_set", conv=ab["conv"], pinned=True)
                assert (r["pinned"], r["muted"]) == (True, False)
                r = await alice.ok("conv_set", conv=ac["conv"], muted=True)
                assert (r["pinned"], r["muted"]) == (False, True)
                p = await alice2.push("conv")
                assert p == {"op": "conv", "conv": ab["conv"], "pinned": True, "muted": False}
                err = await alice.request("conv_set", conv="d:alice:zed", pinned=True)
                assert err["code"] == "not_found"
                for c in (alice, alice2, bob, carol):
                    await c.aclose()
            async with running_server(config, db_dsn) as info:
                c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
                await c.login("alice", register=False, device="desk")
                convs = (await c.ok("sync"))["convs"]
                assert [e["conv"] for e in convs] == [ab["conv"], ac["conv"]]  # pinned first
                assert convs[0]["pinned"] is True and convs[0]["muted"] is False
                assert convs[1]["muted"] is True and convs[1]["unread"] == 1  # muted still counts
                await c.aclose()
            nursery.cancel_scope.cancel()


async def test_notices_pushed_listed_and_read(server: ServerInfo, clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws")
        notices = server.state.notices
        to_alice = await notices.create("security", "New login", "from 10.0.0.1", ["alice"])
        p = await alice.push("notice")
        assert p == {"op": "notice", **to_alice}
        to_all = await notices.create("maintenance", "Downtime", "Sunday 02:00")
        for c in (alice, bob):
            assert (await c.push("notice"))["id"] == to_all["id"]
        listed = await alice.ok("notices")
        assert [n["id"] for n in listed["notices"]] == [to_all["id"], to_alice["id"]]
        assert [n["id"] for n in (await bob.ok("notices"))["notices"]] == [to_all["id"]]
        err = await bob.request("notice_read", id=to_alice["id"])
        assert err["code"] == "not_found"  # not bob's
        await alice.ok("notice_read", id=to_alice["id"])
        await alice.ok("notice_read", id=to_alice["id"])  # idempotent
        assert [n["id"] for n in (await alice.ok("notices"))["notices"]] == [to_all["id"]]
        # A user registered after a notice to everyone does not get it.
        carol = await clients.user("carol")
        assert (await carol.ok("notices"))["notices"] == []


@pytest.mark.parametrize(
    "config", [test_config(limits={"max_notice_users": 2, "max_body_bytes": 100})]
)
async def test_notice_limits(server: ServerInfo, clients: Clients, config: Config) -> None:
    with trio.fail_after(30):
        await clients.user("alice")
        notices = server.state.notices
        cases: list[tuple[dict[str, Any], ErrorCode]] = [
            ({"users": ["alice", "nobody"]}, ErrorCode.NOT_FOUND),
            ({"users": ["a", "b", "c"]}, ErrorCode.TOO_LARGE),
            ({"users": []}, ErrorCode.INVALID),
            ({"body": "x" * 101}, ErrorCode.TOO_LARGE),
            ({"kind": ""}, ErrorCode.INVALID),
        ]
        for extra, code in cases:
            args: dict[str, Any] = {"kind": "k", "title": "t", "body": "b", **extra}
            with pytest.raises(OpError) as e:
                await notices.create(**args)
            assert e.value.code is code, extra
        assert (await server.state.storage.unread_notices("alice", 10)) == []
