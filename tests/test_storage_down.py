"""PostgreSQL stopped under load (acceptance 7) and the writer queue bound.

These tests stop and restart PostgreSQL, so they use a dedicated embedded
cluster (fsync off), not the shared ``pg_cluster``. It is started in a sync,
module-scoped fixture: ``EmbeddedPostgres.start()`` must run in the main thread
(the postmaster's death signal is tied to the thread that forked it). The Trio
test body runs in the main thread too, so the tests restart it by calling
``start()`` directly (it blocks the event loop for a moment, which is fine here),
and stop it from a worker thread so that the server keeps running meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from imserver.storage.bridge import AsyncioThread
from imserver.storage.embedded import EmbeddedPostgres, create_database, drop_database
from protocol.codec import encode_frame

from .client import TestClient
from .conftest import running_server, test_config
from .pgcluster import start_test_cluster
from .test_durability import (
    Pipeline,
    check_conv,
    close_all,
    connect,
    conv_history,
    wait_until,
)

_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A cluster of this module's own, which its tests stop and start."""
    cluster = start_test_cluster(tmp_path_factory.mktemp("pgdown"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def own_dsn(own_cluster: EmbeddedPostgres) -> Iterator[str]:
    """An empty database in ``own_cluster`` (the server migrates it); the
    cluster is running again at the end of the test."""
    if own_cluster.pid is None:
        own_cluster.start()
    name = f"imdown_{next(_db_numbers)}"
    create_database(own_cluster.dsn, name)
    head, _, query = own_cluster.dsn.partition("?")
    try:
        yield f"{head.rsplit('/', 1)[0]}/{name}?{query}"
    finally:
        if own_cluster.pid is None:
            own_cluster.start()
        drop_database(own_cluster.dsn, name)


def _config(**batch: Any) -> Any:
    return test_config(
        batch={"retry_backoff": 0.05, "commit_timeout": 2.0, **batch},
        database={"connect_timeout": 1.0},
        chat={"require_friendship": False},
        rate={"send_per_s": 100000, "send_burst": 100000},
    )


def _cids(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


async def _resend_until_ok(
    clients: dict[str, TestClient], peer: dict[str, str], todo: dict[str, list[str]], bound: float
) -> dict[str, dict[str, dict[str, Any]]]:
    """Resend each user's cids (same cid, same body) until every one is ``ok``."""
    acked: dict[str, dict[str, dict[str, Any]]] = {u: {} for u in todo}
    with trio.fail_after(bound):
        while any(todo.values()):
            pipes = {u: Pipeline(clients[u], peer[u], window=8) for u in todo}
            async with trio.open_nursery() as nursery:
                for u, cids in todo.items():
                    nursery.start_soon(pipes[u].run, list(cids))
            for u, p in pipes.items():
                assert not p.lost, f"{u}: connection lost"
                bad = {c for c in p.errors.values() if c != "unavailable"}
                assert not bad, f"{u}: {p.error_log[:5]}"
                acked[u].update(p.acked)
                todo[u] = [c for c in todo[u] if c not in p.acked]
            if any(todo.values()):
                await trio.sleep(0.1)
    return acked


async def _stop(cluster: EmbeddedPostgres) -> None:
    await trio.to_thread.run_sync(cluster.stop)
    assert cluster.pid is None


async def test_postgres_stopped_under_load(own_cluster: EmbeddedPostgres, own_dsn: str) -> None:
    """Acceptance 7: while PostgreSQL is down sends fail with ``unavailable`` and
    none is acknowledged; nothing acknowledged is lost; after it restarts the same
    cids succeed, each stored exactly once, with gap-free seqs."""
    users = ["u0", "u1", "u2", "u3"]
    peer = {u: users[i ^ 1] for i, u in enumerate(users)}
    conv = {u: f"d:{min(u, peer[u])}:{max(u, peer[u])}" for u in users}
    down = False
    sent_down: set[str] = set()
    acked_while_down: list[tuple[str, dict[str, Any]]] = []
    unavailable_while_down = 0
    other_errors: list[tuple[str, dict[str, Any]]] = []

    def on_send(cid: str) -> None:
        if down:
            sent_down.add(cid)

    def on_reply(cid: str, f: dict[str, Any]) -> None:
        nonlocal unavailable_while_down
        if f["op"] == "ok" and down and cid in sent_down:
            acked_while_down.append((cid, f))
        elif f["op"] == "error":
            if f["code"] != "unavailable":
                other_errors.append((cid, f))
            elif down:
                unavailable_while_down += 1

    opened: list[TestClient] = []
    with trio.fail_after(90):
        try:
            async with running_server(_config(), own_dsn) as info:
                port = info.tcp_port
                assert port is not None
                cs = {u: await connect(port, u, register=True) for u in users}
                opened += cs.values()
                watcher = await connect(port, "watcher", register=True)
                opened.append(watcher)
                pipes = {
                    u: Pipeline(
                        cs[u],
                        peer[u],
                        window=8,
                        error_pause=0.02,
                        on_send=on_send,
                        on_reply=on_reply,
                    )
                    for u in users
                }

                def acks() -> int:
                    return sum(len(p.acked) for p in pipes.values())

                stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    for u in users:
                        nursery.start_soon(pipes[u].run, _cids(u), stop)
                    with trio.fail_after(30):
                        await wait_until(lambda: acks() >= 300)
                    # PostgreSQL goes away under load.
                    await _stop(own_cluster)
                    down = True
                    acks_at_stop = acks()
                    with trio.fail_after(20):
                        await wait_until(
                            lambda: unavailable_while_down >= 20 and len(sent_down) >= 50
                        )
                    # Reads fail cleanly too (sync needs the database).
                    r = await watcher.request("sync")
                    assert (r["op"], r.get("code")) == ("error", "unavailable"), r
                    # And it comes back; sends succeed again without a server restart.
                    down = False
                    own_cluster.start()
                    with trio.fail_after(20):
                        await wait_until(lambda: acks() >= acks_at_stop + 300)
                    stop.set()
                assert not other_errors, other_errors[:5]
                assert not acked_while_down, f"acked while down: {acked_while_down[:5]}"
                assert unavailable_while_down >= 1
                for u, p in pipes.items():
                    assert not p.lost, f"{u}: connection lost"
                    assert not p.inflight, f"{u}: sends never answered"
                retry = {u: [c for c in p.unacked if c in p.errors] for u, p in pipes.items()}
                assert sum(map(len, retry.values())) >= 20
                acked = {u: dict(p.acked) for u, p in pipes.items()}
                sent = {u: set(p.sent) for u, p in pipes.items()}
                assert all(set(p.unacked) == set(retry[u]) for u, p in pipes.items())

                # Every refused cid, retried, succeeds: exactly one copy of everything.
                again = await _resend_until_ok(cs, peer, {u: list(c) for u, c in retry.items()}, 20)
                for u in users:
                    assert set(again[u]) == set(retry[u])
                    acked[u].update(again[u])
                total = 0
                for c in sorted(set(conv.values())):
                    members = [u for u in users if conv[u] == c]
                    views = {u: await conv_history(cs[u], c) for u in members}
                    total += check_conv(c, views, sent, acked, complete=True)
                assert total == sum(map(len, sent.values()))
                await close_all(opened)
                opened.clear()
        finally:
            await close_all(opened)


class _TableLock:
    """Holds ACCESS EXCLUSIVE on ``messages`` in an open transaction (a slow commit)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.bridge = AsyncioThread("test-lock")
        self.conn: Any = None
        self.tr: Any = None

    async def acquire(self) -> None:
        import asyncpg

        async def lock() -> None:
            self.conn = await asyncpg.connect(self.dsn)
            self.tr = self.conn.transaction()
            await self.tr.start()
            await self.conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")

        self.bridge.start()
        await self.bridge.call(lock)

    async def release(self) -> None:
        async def unlock() -> None:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    await self.tr.rollback()
                await self.conn.close()
                self.conn = None

        try:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.bridge.call(unlock)
        finally:
            self.bridge.stop()


async def _replies(
    c: TestClient, rids: set[int], *, until_errors: int | None = None
) -> dict[int, dict[str, Any]]:
    """Read replies to ``rids`` (pushes are kept): all of them, or only until
    ``until_errors`` of them are errors."""
    got: dict[int, dict[str, Any]] = {}
    while len(got) < len(rids):
        errors = sum(f["op"] == "error" for f in got.values())
        if until_errors is not None and errors >= until_errors:
            break
        f = await c.recv_frame()
        if f.get("rid") in rids and f["op"] in ("ok", "error"):
            got[f["rid"]] = f
        else:
            c.pushes.append(f)
    return got


def _burst(cids: list[str], first_rid: int) -> tuple[bytes, dict[int, str]]:
    frames = {first_rid + i: cid for i, cid in enumerate(cids)}
    data = b"".join(
        encode_frame({"op": "send", "rid": rid, "to": "bob", "cid": cid, "body": f"body of {cid}"})
        for rid, cid in frames.items()
    )
    return data, frames


async def test_full_writer_queue_refuses_at_once(
    own_cluster: EmbeddedPostgres, own_dsn: str, tmp_path: Path
) -> None:
    """``batch.max_queue`` bounds the writer queue: beyond it a send is refused
    with ``unavailable`` at once (no hang), whether the commit is slow (a table
    lock) or PostgreSQL is down; after it returns, everything acked is stored."""
    max_queue = 8
    cfg = _config(max_queue=max_queue, commit_timeout=15.0)
    opened: list[TestClient] = []
    acked: dict[str, dict[str, Any]] = {}
    refused: list[str] = []
    lock: _TableLock | None = None
    with trio.fail_after(60):
        try:
            async with running_server(cfg, own_dsn) as info:
                port = info.tcp_port
                assert port is not None
                alice = await connect(port, "alice", register=True)
                bob = await connect(port, "bob", register=True)
                opened += [alice, bob]
                r = await alice.ok("send", to="bob", cid="w0", body="body of w0")
                acked["w0"] = r

                # 1. A slow commit: the writer holds up to max_queue rows in its
                # batch, max_queue more wait in the queue, the rest are refused now.
                lock = _TableLock(own_dsn)
                await lock.acquire()
                n = 40
                data, frames = _burst([f"a{i}" for i in range(n)], 1000)
                await alice.send_raw(data)
                # At most max_queue rows in the blocked batch and max_queue queued:
                # the others are refused while the commit is still blocked.
                with trio.fail_after(5):
                    early = await _replies(alice, set(frames), until_errors=n - 2 * max_queue)
                assert all(f["op"] == "error" for f in early.values()), early
                assert all(f["code"] == "unavailable" for f in early.values()), early
                assert all("queue" in f.get("message", "") for f in early.values()), early
                await lock.release()
                lock = None
                with trio.fail_after(10):
                    rest = await _replies(alice, set(frames) - set(early))
                got = early | rest
                oks = {frames[rid]: f for rid, f in got.items() if f["op"] == "ok"}
                assert 1 <= len(oks) <= 2 * max_queue, got
                assert all(f["code"] == "unavailable" for f in got.values() if f["op"] == "error")
                acked.update(oks)
                refused += [frames[rid] for rid, f in got.items() if f["op"] == "error"]

                # 2. PostgreSQL down: the same bound, every send answered.
                await _stop(own_cluster)
                data, frames = _burst([f"b{i}" for i in range(40)], 2000)
                await alice.send_raw(data)
                with trio.fail_after(10):
                    got = await _replies(alice, set(frames))
                assert all(f["op"] == "error" and f["code"] == "unavailable" for f in got.values())
                full = [f for f in got.values() if "queue" in f.get("message", "")]
                assert len(full) >= 1, got
                refused += list(frames.values())
                own_cluster.start()

                # 3. Back: every refused cid succeeds on retry, once.
                again = await _resend_until_ok(
                    {"alice": alice}, {"alice": "bob"}, {"alice": refused}, 20
                )
                acked.update(again["alice"])
                sent = set(acked)
                views = {
                    "alice": await conv_history(alice, "d:alice:bob"),
                    "bob": await conv_history(bob, "d:alice:bob"),
                }
                n = check_conv(
                    "d:alice:bob",
                    views,
                    {"alice": sent, "bob": set()},
                    {"alice": acked, "bob": {}},
                    complete=True,
                )
                assert n == 1 + 40 + 40
                await close_all(opened)
                opened.clear()
        finally:
            if lock is not None:
                await lock.release()
            await close_all(opened)


async def test_stuck_commit_fails_after_commit_timeout(own_dsn: str) -> None:
    """A commit that cannot finish (here: blocked by a table lock) fails its batch
    with ``unavailable`` after ``batch.commit_timeout``, commits nothing, and the
    same cids succeed once the lock is gone, with no seq gap."""
    cfg = _config(commit_timeout=1.0)
    opened: list[TestClient] = []
    lock: _TableLock | None = None
    with trio.fail_after(40):
        try:
            async with running_server(cfg, own_dsn) as info:
                port = info.tcp_port
                assert port is not None
                alice = await connect(port, "alice", register=True)
                bob = await connect(port, "bob", register=True)
                opened += [alice, bob]
                r0 = await alice.ok("send", to="bob", cid="w0", body="body of w0")
                lock = _TableLock(own_dsn)
                await lock.acquire()
                cids = [f"s{i}" for i in range(5)]
                data, frames = _burst(cids, 100)
                t0 = trio.current_time()
                await alice.send_raw(data)
                with trio.fail_after(10):
                    got = await _replies(alice, set(frames))
                waited = trio.current_time() - t0
                assert all(f["op"] == "error" for f in got.values()), got
                assert {f["code"] for f in got.values()} == {"unavailable"}
                assert waited >= 0.9, waited
                await lock.release()
                lock = None
                acked = {"w0": r0}
                again = await _resend_until_ok(
                    {"alice": alice}, {"alice": "bob"}, {"alice": cids}, 10
                )
                acked.update(again["alice"])
                assert sorted(f["seq"] for f in again["alice"].values()) == [2, 3, 4, 5, 6]
                views = {
                    "alice": await conv_history(alice, "d:alice:bob"),
                    "bob": await conv_history(bob, "d:alice:bob"),
                }
                n = check_conv(
                    "d:alice:bob",
                    views,
                    {"alice": set(acked), "bob": set()},
                    {"alice": acked, "bob": {}},
                    complete=True,
                )
                assert n == 6
                await close_all(opened)
                opened.clear()
        finally:
            if lock is not None:
                await lock.release()
            await close_all(opened)
