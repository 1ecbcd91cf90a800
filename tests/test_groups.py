"""Groups end to end: real server, real PostgreSQL, real sockets (issue 3, acceptance 1-3)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from imserver.app import ServerInfo
from imserver.config import Config
from imserver.storage.errors import StorageUnavailable

from .client import TestClient
from .conftest import Clients, test_config
from .test_bad_input import raw_tcp_client


async def _group(owner: TestClient, *members: TestClient, name: str = "team") -> str:
    r = await owner.ok("group_create", name=name, members=[m.user for m in members])
    assert r["conv"] == f"g:{r['group']}" and r["seq"] == 1
    for m in members:
        ev = await m.push("group")
        assert ev["event"] == "created" and ev["group"] == r["group"]
        sysmsg = await m.push("msg")
        assert sysmsg["kind"] == "system" and sysmsg["seq"] == 1
    return str(r["group"])


async def _drain(c: TestClient) -> None:
    """Wait until everything the server queued for ``c`` so far has arrived."""
    await c.ok("ping")


async def test_group_chat_reaches_every_member_once_in_order(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice", "tcp")
        bob = await clients.user("bob", "ws")
        carol = await clients.user("carol", "ws-json")
        gid = await _group(alice, bob, carol)
        sent = []
        for i in range(5):
            sender = (alice, bob, carol)[i % 3]
            sent.append(await sender.ok("send", group=gid, cid=f"c{i}", body=f"m{i}"))
        assert [r["seq"] for r in sent] == [2, 3, 4, 5, 6]
        for c in (alice, bob, carol):
            await _drain(c)
            msgs = [p for p in c.pushes if p["op"] == "msg"]
            own = {r["seq"] for i, r in enumerate(sent) if (alice, bob, carol)[i % 3] is c}
            assert [m["seq"] for m in msgs] == sorted({2, 3, 4, 5, 6} - own)
            assert all(m["conv"] == f"g:{gid}" and "cid" not in m for m in msgs)
        sync = await bob.ok("sync")
        entry = next(e for e in sync["convs"] if e["conv"] == f"g:{gid}")
        assert entry["kind"] == "group" and entry["title"] == "team"
        assert entry["last_seq"] == 6 and entry["unread"] == 3  # m0, m2, m3 from others
        hist = await carol.ok("history", conv=f"g:{gid}")
        assert [m["seq"] for m in hist["msgs"]] == [1, 2, 3, 4, 5, 6]
        assert hist["msgs"][0]["kind"] == "system"
        assert hist["msgs"][0]["meta"]["event"] == "created"


async def test_send_by_conv_id_and_non_member_refused(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        eve = await clients.user("eve")
        gid = await _group(alice, bob)
        r = await bob.ok("send", conv=f"g:{gid}", cid="x", body="via conv")
        assert r["seq"] == 2
        for op, fields in [
            ("send", {"group": gid, "cid": "e1", "body": "hi"}),
            ("history", {"conv": f"g:{gid}"}),
            ("typing", {"group": gid, "on": True}),
            ("group_info", {"group": gid}),
            ("group_add", {"group": gid, "users": ["eve"]}),
        ]:
            err = await eve.request(op, **fields)
            assert err["code"] == "forbidden", (op, err)
        for op, fields in [
            ("send", {"group": "999999", "cid": "e2", "body": "hi"}),
            ("history", {"conv": "g:999999"}),
            ("group_info", {"group": "999999"}),
            ("group_leave", {"group": "nope"}),
        ]:
            err = await eve.request(op, **fields)
            assert err["code"] == "not_found", (op, err)


async def test_typing_and_mentions(clients: Clients) -> None:
    with trio.fail_after(20):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        carol = await clients.user("carol")
        gid = await _group(alice, bob, carol)
        await alice.ok("typing", group=gid, on=True)
        for c in (bob, carol):
            t = await c.push("typing")
            assert t == {"op": "typing", "conv": f"g:{gid}", "user": "alice", "on": True}
        err = await alice.request("send", group=gid, cid="m0", body="hi", mentions=["eve"])
        assert err["code"] == "invalid"
        await alice.ok("send", group=gid, cid="m1", body="@bob look", mentions=["bob"])
        m = await bob.push("msg")
        assert m["mentions"] == ["bob"]
        sync = {e["conv"]: e for e in (await bob.ok("sync"))["convs"]}
        assert sync[f"g:{gid}"]["mentioned"] is True
        sync_c = {e["conv"]: e for e in (await carol.ok("sync"))["convs"]}
        assert sync_c[f"g:{gid}"]["mentioned"] is False
        await bob.ok("read", conv=f"g:{gid}", seq=m["seq"])
        sync = {e["conv"]: e for e in (await bob.ok("sync"))["convs"]}
        assert sync[f"g:{gid}"]["mentioned"] is False and sync[f"g:{gid}"]["unread"] == 0
        # Direct messages take no mentions.
        err = await alice.request("send", to="bob", cid="d1", body="x", mentions=["bob"])
        assert err["code"] in ("invalid", "forbidden")


async def _role_setup(clients: Clients) -> tuple[str, dict[str, TestClient]]:
    cs = {n: await clients.user(n) for n in ("owner", "adm", "adm2", "mem", "mem2", "out")}
    gid = await _group(cs["owner"], cs["adm"], cs["adm2"], cs["mem"], cs["mem2"])
    for a in ("adm", "adm2"):
        await cs["owner"].ok("group_role", group=gid, user=a, role="admin")
    return gid, cs


async def _members(c: TestClient, gid: str) -> dict[str, str]:
    info = await c.ok("group_info", group=gid)
    return {m["user"]: m["role"] for m in info["members"]}


async def test_forbidden_actions_change_nothing(clients: Clients) -> None:
    with trio.fail_after(30):
        gid, cs = await _role_setup(clients)
        before = await _members(cs["owner"], gid)
        last = (await cs["owner"].ok("history", conv=f"g:{gid}"))["msgs"][-1]["seq"]
        forbidden = [
            ("adm", "group_dissolve", {}),
            ("mem", "group_dissolve", {}),
            ("adm", "group_role", {"user": "mem", "role": "admin"}),
            ("mem", "group_role", {"user": "mem2", "role": "admin"}),
            ("adm", "group_role", {"user": "adm", "role": "owner"}),
            ("mem", "group_add", {"users": ["out"]}),
            ("mem", "group_remove", {"users": ["mem2"]}),
            ("adm", "group_remove", {"users": ["owner"]}),
            ("adm", "group_remove", {"users": ["adm2"]}),
            ("mem", "group_update", {"name": "renamed"}),
            ("out", "group_update", {"name": "renamed"}),
            ("out", "group_leave", {}),
        ]
        for who, op, fields in forbidden:
            err = await cs[who].request(op, group=gid, **fields)
            assert err["code"] == "forbidden", (who, op, err)
        assert await _members(cs["owner"], gid) == before
        hist = await cs["owner"].ok("history", conv=f"g:{gid}")
        assert hist["msgs"][-1]["seq"] == last


async def test_allowed_actions_are_system_messages_for_all(clients: Clients) -> None:
    with trio.fail_after(30):
        gid, cs = await _role_setup(clients)
        conv = f"g:{gid}"
        steps: list[tuple[str, str, dict[str, Any], str]] = [
            ("adm", "group_add", {"users": ["out"]}, "added"),
            ("adm", "group_remove", {"users": ["out"]}, "removed"),
            ("adm", "group_update", {"name": "renamed"}, "updated"),
            ("owner", "group_role", {"user": "mem", "role": "admin"}, "role"),
            ("owner", "group_remove", {"users": ["adm2"]}, "removed"),
            ("mem2", "group_leave", {}, "left"),
            ("owner", "group_role", {"user": "adm", "role": "owner"}, "role"),
        ]
        seqs = []
        for who, op, fields, event in steps:
            r = await cs[who].ok(op, group=gid, **fields)
            seqs.append(r["seq"])
            hist = await cs["mem"].ok("history", conv=conv, after_seq=r["seq"] - 1)
            entry = hist["msgs"][0]
            assert entry["seq"] == r["seq"] and entry["kind"] == "system"
            assert entry["meta"]["event"] == event and entry["from"] == who
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        roles = await _members(cs["adm"], gid)
        assert roles == {"adm": "owner", "owner": "admin", "mem": "admin"}
        # Everyone still in the group saw every system entry as a msg push.
        await _drain(cs["mem"])
        got = [p["seq"] for p in cs["mem"].pushes if p["op"] == "msg" and p["conv"] == conv]
        assert set(seqs) <= set(got)
        # The new owner dissolves; nothing changes afterwards, history stays readable.
        await cs["adm"].ok("group_dissolve", group=gid)
        err = await cs["mem"].request("send", group=gid, cid="late", body="x")
        assert err["code"] == "conflict"
        err = await cs["adm"].request("group_add", group=gid, users=["out"])
        assert err["code"] == "conflict"
        hist = await cs["mem"].ok("history", conv=conv)
        assert hist["msgs"][-1]["meta"]["event"] == "dissolved"
        info = await cs["mem"].ok("group_info", group=gid)
        assert info["dissolved"] is True


async def test_owner_leaving_hands_over_to_longest_standing_admin(clients: Clients) -> None:
    with trio.fail_after(30):
        gid, cs = await _role_setup(clients)
        r = await cs["owner"].ok("group_leave", group=gid)
        assert r["group"] == gid
        roles = await _members(cs["adm"], gid)
        # adm and adm2 joined together (seq 1); ties go by name.
        assert roles["adm"] == "owner" and "owner" not in roles
        ev = await cs["mem"].push("group")
        while ev["event"] != "left":
            ev = await cs["mem"].push("group")
        assert ev["owner"] == "adm" and ev["by"] == "owner"
        err = await cs["owner"].request("send", group=gid, cid="x", body="x")
        assert err["code"] == "forbidden"


async def test_members_without_admins_inherit_then_last_leaver_dissolves(
    clients: Clients,
) -> None:
    with trio.fail_after(30):
        a = await clients.user("a")
        b = await clients.user("b")
        c = await clients.user("c")
        gid = await _group(a, b)
        await a.ok("group_add", group=gid, users=["c"])
        await a.ok("group_leave", group=gid)
        assert await _members(b, gid) == {"b": "owner", "c": "member"}
        await b.ok("group_leave", group=gid)
        await c.ok("group_leave", group=gid)
        hist = await c.ok("history", conv=f"g:{gid}")
        assert hist["msgs"][-1]["meta"] == {
            "group": gid,
            "event": "left",
            "users": ["c"],
            "dissolved": True,
        }
        groups = await c.ok("groups")
        assert groups["groups"] == []


async def test_group_list_info_and_idempotent_add(clients: Clients) -> None:
    with trio.fail_after(20):
        a = await clients.user("a")
        b = await clients.user("b")
        gid = await _group(a, b, name="first")
        r = await a.ok("group_add", group=gid, users=["b"])
        assert r == {"op": "ok", "rid": r["rid"], "group": gid, "added": []}
        err = await a.request("group_add", group=gid, users=["nobody"])
        assert err["code"] == "not_found"
        lst = await b.ok("groups")
        assert lst["groups"] == [
            {
                "group": gid,
                "conv": f"g:{gid}",
                "name": "first",
                "avatar": "",
                "owner": "a",
                "role": "member",
                "members": 2,
                "dissolved": False,
            }
        ]
        await a.ok("group_update", group=gid, avatar="https://x/y.png")
        info = await b.ok("group_info", group=gid)
        assert info["avatar"] == "https://x/y.png" and info["owner"] == "a"
        assert info["members"] == [{"user": "a", "role": "owner"}, {"user": "b", "role": "member"}]


async def test_removed_member_cut_off_at_removal_seq(clients: Clients) -> None:
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob", "ws")
        gid = await _group(alice, bob)
        conv = f"g:{gid}"
        await alice.ok("send", group=gid, cid="before", body="before")
        r = await alice.ok("group_remove", group=gid, users=["bob"])
        s = r["seq"]
        for i in range(3):
            await alice.ok("send", group=gid, cid=f"after{i}", body="after")
        await _drain(bob)
        seqs = [p["seq"] for p in bob.pushes if p["op"] == "msg"]
        assert max(seqs) == s and s in seqs
        ev = [p for p in bob.pushes if p["op"] == "group"][-1]
        assert ev["event"] == "removed" and ev["users"] == ["bob"] and ev["seq"] == s
        hist = await bob.ok("history", conv=conv)
        assert hist["msgs"][-1]["seq"] == s and not hist["more"]
        hist = await bob.ok("history", conv=conv, after_seq=s - 1)
        assert [m["seq"] for m in hist["msgs"]] == [s]
        err = await bob.request("send", group=gid, cid="nope", body="x")
        assert err["code"] == "forbidden"
        err = await bob.request("typing", group=gid, on=True)
        assert err["code"] == "forbidden"
        sync = {e["conv"]: e for e in (await bob.ok("sync"))["convs"]}
        assert sync[conv]["last_seq"] == s and sync[conv]["left"] is True
        # Added back: the gap stays unread-free, new messages arrive again.
        r = await alice.ok("group_add", group=gid, users=["bob"])
        await alice.ok("send", group=gid, cid="back", body="welcome back")
        m = await bob.push("msg")
        while m["seq"] <= r["seq"]:
            m = await bob.push("msg")
        assert m["body"] == "welcome back"
        sync = {e["conv"]: e for e in (await bob.ok("sync"))["convs"]}
        assert sync[conv]["unread"] == 1 and "left" not in sync[conv]


async def test_removal_and_send_race_in_one_batch(clients: Clients) -> None:
    """Sends queued behind a removal are checked in commit order, not at request time."""
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        gid = await _group(alice, bob)
        # Pipeline: bob fires sends without waiting while alice removes him.
        for i in range(20):
            await bob.send_frame(
                {"op": "send", "rid": 1000 + i, "group": gid, "cid": f"r{i}", "body": "x"}
            )
        removal = await alice.ok("group_remove", group=gid, users=["bob"])
        replies = []
        while len(replies) < 20:
            f = await bob.recv_frame()
            if f.get("rid", 0) >= 1000:
                replies.append(f)
        ok = [f["seq"] for f in replies if f["op"] == "ok"]
        refused = [f for f in replies if f["op"] == "error"]
        assert all(s < removal["seq"] for s in ok)
        assert all(f["code"] == "forbidden" for f in refused)
        hist = await alice.ok("history", conv=f"g:{gid}", limit=200)
        seqs = [m["seq"] for m in hist["msgs"]]
        assert seqs == list(range(1, len(seqs) + 1))
        assert not [m for m in hist["msgs"] if m["from"] == "bob" and m["seq"] > removal["seq"]]


GROUP_LIMIT = test_config(groups={"max_members": 5})


@pytest.mark.parametrize("config", [GROUP_LIMIT])
async def test_member_limit(clients: Clients, config: Config) -> None:
    with trio.fail_after(30):
        users = [await clients.user(f"u{i}") for i in range(7)]
        err = await users[0].request("group_create", name="big", members=[u.user for u in users])
        assert err["code"] == "too_large"
        gid = await _group(users[0], *users[1:4])
        err = await users[0].request("group_add", group=gid, users=["u4", "u5"])
        assert err["code"] == "conflict"
        assert len(await _members(users[0], gid)) == 4
        await users[0].ok("group_add", group=gid, users=["u4"])
        err = await users[0].request("group_add", group=gid, users=["u5"])
        assert err["code"] == "conflict"
        assert len(await _members(users[0], gid)) == 5


FULL = test_config(
    auth={"login_per_addr_per_min": 100_000},
    session={"auth_timeout": 120.0},
    limits={"outbound_queue": 4096},
)


@pytest.mark.parametrize("config", [FULL])
async def test_full_group_of_500_mixed_transports(clients: Clients, config: Config) -> None:
    """Acceptance 1: 500 members online over TCP, WebSocket and WebSocket-JSON."""
    n = config.groups.max_members
    members: list[TestClient] = [None] * n  # type: ignore[list-item]
    kinds = ["tcp", "tcp", "ws", "ws-json"]
    limiter = trio.CapacityLimiter(16)

    async def join(i: int) -> None:
        async with limiter:
            members[i] = await clients.user(f"m{i:03d}", kinds[i % len(kinds)])

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(join, i)
        extra = await clients.user("m500")
        owner = members[0]
        r = await owner.ok("group_create", name="all", members=[m.user for m in members[1:]])
        gid, conv = r["group"], r["conv"]
        err = await owner.request("group_add", group=gid, users=["m500"])
        assert err["code"] == "conflict"
        senders = [members[1], members[n // 2], members[n - 1]]
        acks: list[dict[str, Any]] = []

        async def send(c: TestClient, k: int) -> None:
            acks.append(await c.ok("send", group=gid, cid=f"s{k}", body=f"from {c.user}"))

        async with trio.open_nursery() as nursery:
            for k, c in enumerate(senders):
                nursery.start_soon(send, c, k)
        acked = {a["seq"]: a for a in acks}
        assert sorted(acked) == [2, 3, 4]

        async def collect(c: TestClient) -> None:
            want = 3 - sum(1 for s in senders if s is c)
            got: list[dict[str, Any]] = [
                p for p in c.pushes if p["op"] == "msg" and p["conv"] == conv and p["seq"] > 1
            ]
            while len(got) < want:
                f = await c.recv_frame()
                if f["op"] == "msg" and f["conv"] == conv and f["seq"] > 1:
                    got.append(f)
            await _drain(c)
            got += [
                p
                for p in c.pushes
                if p["op"] == "msg" and p["conv"] == conv and p["seq"] > 1 and p not in got
            ]
            seqs = [m["seq"] for m in got]
            assert seqs == sorted(set(seqs)) and len(seqs) == want, (c.user, seqs)
            assert all(m["from"] != c.user for m in got)

        async with trio.open_nursery() as nursery:
            for c in members:
                nursery.start_soon(collect, c)
        assert (await extra.request("history", conv=conv))["code"] == "forbidden"


async def test_change_with_unknown_outcome_reloads_roster(
    server: ServerInfo, clients: Clients
) -> None:
    """A commit that lands but reports failure (a timeout after COMMIT) must not
    leave the roster cache behind PostgreSQL."""
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        gid = await _group(alice, bob)
        await bob.ok("send", group=gid, cid="b0", body="still in")
        storage = server.state.storage
        real = storage.commit_batch
        failed = []

        async def commit_then_fail(*args: Any, **kwargs: Any) -> Any:
            result = await real(*args, **kwargs)
            if not failed:
                failed.append(True)
                raise StorageUnavailable("commit timed out (injected)")
            return result

        storage.commit_batch = commit_then_fail  # type: ignore[method-assign]
        try:
            err = await alice.request("group_remove", group=gid, users=["bob"])
        finally:
            storage.commit_batch = real  # type: ignore[method-assign]
        assert err["code"] == "unavailable"
        # PostgreSQL has the removal; the server must act on it.
        err = await bob.request("send", group=gid, cid="b1", body="after removal")
        assert err["code"] == "forbidden"
        info = await alice.ok("group_info", group=gid)
        assert [m["user"] for m in info["members"]] == ["alice"]


@pytest.mark.parametrize(
    "config", [test_config(limits={"outbound_queue": 16}, rate={"send_burst": 10000})]
)
async def test_slow_member_is_kicked_without_delaying_the_others(
    server: ServerInfo, clients: Clients, config: Config
) -> None:
    with trio.fail_after(60):
        assert server.tcp_port is not None
        slow = await raw_tcp_client(server.tcp_port, 4096)
        clients.opened.append(slow)
        await slow.login("slow")
        sender = await clients.user("sender")
        fast = await clients.user("fast", "ws")
        gid = await _group(sender, fast)
        await sender.ok("group_add", group=gid, users=["slow"])
        await slow.ok("ping")
        # From here on, slow never reads its socket.
        body = "x" * 8000
        acked = []
        for i in range(400):
            if not server.state.hub.devices("slow") and len(acked) > 20:
                break
            t = trio.current_time()
            acked.append((await sender.ok("send", group=gid, cid=f"m{i}", body=body))["seq"])
            assert trio.current_time() - t < 3.0
        assert server.state.hub.devices("slow") == [], "the slow member was never kicked"
        assert server.state.stats.kicks.get("slow_consumer", 0) == 1
        # The fast member got every message, in order, and stays connected.
        got = []
        while len(got) < len(acked):
            m = await fast.push("msg")
            if m["kind"] != "system":
                got.append(m["seq"])
        assert got == acked
        assert server.state.hub.devices("fast") != []
