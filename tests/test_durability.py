"""Idempotent sends and durability across restarts and SIGKILL (acceptance 2 and 3).

* Idempotency runs the server in-process: it is stopped and started again on the
  same database, and a repeated ``cid`` must give back the first send's reply and
  deliver nothing new (PROTOCOL §5).
* Durability runs the real ``imserver`` command as a subprocess, SIGKILLs it in
  the middle of a pipelined load and starts it again: every acknowledged message
  must be stored with the acknowledged mid/seq, and resending every unacknowledged
  ``cid`` must leave exactly one copy of each, with gap-free seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import psutil
import pytest
import trio

from protocol.codec import encode_frame

from .client import Closed, TestClient
from .conftest import Clients, befriend, running_server, test_config

REPO = Path(__file__).resolve().parent.parent
CONN_ERRORS = (Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# --------------------------------------------------------------------------- helpers


async def connect(port: int, user: str, *, device: str = "default", register: bool) -> TestClient:
    c = await TestClient.tcp(port)
    await c.login(user, device=device, register=register)
    return c


async def close_all(clients: Iterable[TestClient]) -> None:
    with trio.move_on_after(5):
        for c in clients:
            with contextlib.suppress(*CONN_ERRORS):
                await c.aclose()


async def conv_history(c: TestClient, conv: str) -> list[dict[str, Any]]:
    """Every message of ``conv`` seen by ``c``, paging with ``after_seq``."""
    msgs: list[dict[str, Any]] = []
    after = 0
    while True:
        r = await c.ok("history", conv=conv, after_seq=after, limit=200)
        msgs += r["msgs"]
        if not r["more"]:
            return msgs
        after = r["msgs"][-1]["seq"]


def same_reply(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("mid", "conv", "seq", "ts")
    return all(a[k] == b[k] for k in keys)


class Pipeline:
    """Keeps up to ``window`` sends in flight on one connection.

    Records every cid whose frame was (even partly) written in ``sent``, the
    ``ok`` reply of every acknowledged one in ``acked`` and the error code of
    every refused one in ``errors``. A lost connection ends :meth:`run` quietly
    (``lost`` is set); in-flight cids then stay unanswered.
    """

    def __init__(
        self,
        client: TestClient,
        to: str,
        *,
        window: int = 8,
        error_pause: float = 0.0,
        on_send: Callable[[str], None] | None = None,
        on_reply: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.client = client
        self.to = to
        self.window = window
        self.error_pause = error_pause
        self.on_send = on_send
        self.on_reply = on_reply
        self.sent: list[str] = []
        self.acked: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.error_log: list[tuple[str, str]] = []
        self.inflight: dict[int, str] = {}
        self.pushes: list[dict[str, Any]] = []
        self.lost = False
        self._rids = itertools.count(1_000_000)
        self._last_error = -1e9

    @property
    def unacked(self) -> list[str]:
        return [c for c in dict.fromkeys(self.sent) if c not in self.acked]

    async def run(self, cids: Iterable[str], stop: trio.Event | None = None) -> None:
        sem = trio.Semaphore(self.window)
        drained = trio.Event()
        writer_scope = trio.CancelScope()
        writer_done = False

        async def reader() -> None:
            try:
                while True:
                    f = await self.client.recv_frame()
                    cid = None
                    if f.get("op") in ("ok", "error"):
                        cid = self.inflight.pop(f.get("rid"), None)  # type: ignore[arg-type]
                    if cid is None:
                        self.pushes.append(f)
                        continue
                    if f["op"] == "ok":
                        self.acked[cid] = f
                        self.errors.pop(cid, None)
                    else:
                        self.errors[cid] = f["code"]
                        self.error_log.append((cid, f["code"]))
                        self._last_error = trio.current_time()
                    if self.on_reply is not None:
                        self.on_reply(cid, f)
                    sem.release()
                    if writer_done and not self.inflight:
                        drained.set()
            except CONN_ERRORS:
                self.lost = True
                writer_scope.cancel()
                drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with writer_scope:
                try:
                    for cid in cids:
                        if (stop is not None and stop.is_set()) or self.lost:
                            break
                        if (
                            self.error_pause
                            and trio.current_time() - self._last_error < self.error_pause
                        ):
                            await trio.sleep(self.error_pause)
                        await sem.acquire()
                        rid = next(self._rids)
                        self.inflight[rid] = cid
                        self.sent.append(cid)
                        if self.on_send is not None:
                            self.on_send(cid)
                        frame = {"op": "send", "rid": rid, "to": self.to, "cid": cid}
                        frame["body"] = f"body of {cid}"
                        await self.client.send_frame(frame)
                except CONN_ERRORS:
                    self.lost = True
            writer_done = True
            if not self.inflight or self.lost:
                drained.set()
            await drained.wait()
            nursery.cancel_scope.cancel()


async def wait_until(pred: Callable[[], bool], poll: float = 0.01) -> None:
    """Poll ``pred``: the state it reads is changed by other tasks."""
    while True:
        if pred():
            return
        await trio.sleep(poll)


def numbered(prefix: str) -> Iterator[str]:
    return (f"{prefix}-{i}" for i in itertools.count())


def check_conv(
    conv: str,
    views: dict[str, list[dict[str, Any]]],
    sent: dict[str, set[str]],
    acked: dict[str, dict[str, dict[str, Any]]],
    *,
    complete: bool,
) -> int:
    """Check one conversation as seen (via history) by each of its members.

    ``views[user]`` is the history as ``user`` sees it (``cid`` only on the
    user's own messages). Seqs must be 1..N without gap or repeat, no cid may
    appear twice, every acked cid must be there with its acked mid/seq/conv, and
    nothing but sent cids may be there; with ``complete`` every sent cid must be
    there. Returns N.
    """
    users = sorted(views)
    base = [(m["seq"], m["mid"], m["from"]) for m in views[users[0]]]
    n = len(base)
    assert [s for s, _, _ in base] == list(range(1, n + 1)), f"{conv}: seqs not 1..{n}"
    for u in users[1:]:
        other = [(m["seq"], m["mid"], m["from"]) for m in views[u]]
        assert other == base, f"{conv}: {u} and {users[0]} see different histories"
    mids = [mid for _, mid, _ in base]
    assert len(set(mids)) == n, f"{conv}: repeated mids"
    for u in users:
        own = [m for m in views[u] if m["from"] == u]
        cids = [m["cid"] for m in own]
        dups = {c for c in cids if cids.count(c) > 1}
        assert not dups, f"{conv}: duplicate cids from {u}: {sorted(dups)[:10]}"
        stored = set(cids)
        assert stored <= sent[u], f"{conv}: unknown cids {sorted(stored - sent[u])[:10]}"
        if complete:
            missing = sent[u] - stored
            assert not missing, (
                f"{conv}: {len(missing)} sent cids of {u} missing: {sorted(missing)[:10]}"
            )
        by_cid = {m["cid"]: m for m in own}
        lost = [c for c in acked[u] if c not in by_cid]
        assert not lost, f"{conv}: {len(lost)} ACKNOWLEDGED messages of {u} lost: {lost[:10]}"
        for cid, ack in acked[u].items():
            m = by_cid[cid]
            got = (m["mid"], m["conv"], m["seq"], m["ts"])
            want = (ack["mid"], ack["conv"], ack["seq"], ack["ts"])
            assert got == want, f"{conv}: {cid} stored as {got}, acked as {want}"
            assert m["body"] == f"body of {cid}"
    return n


# ------------------------------------------------------------------ idempotency (in-process)


async def test_same_cid_on_two_connections_and_after_restart(db_dsn: str) -> None:
    """Acceptance 2: one stored message and one delivery for a cid repeated on
    two connections and again after a server restart."""
    cfg = test_config()
    opened: list[TestClient] = []
    with trio.fail_after(60):
        try:
            async with running_server(cfg, db_dsn) as info:
                port = info.tcp_port
                assert port is not None
                a1 = await connect(port, "alice", device="phone", register=True)
                bob = await connect(port, "bob", register=True)
                opened += [a1, bob]
                await befriend(a1, bob)
                a2 = await connect(port, "alice", device="laptop", register=False)
                opened.append(a2)

                # 1. Sequentially on two connections (and once more naming the conv,
                # with another body): the first send's reply every time.
                r1 = await a1.ok("send", to="bob", cid="c1", body="first")
                assert r1["seq"] == 1
                assert r1["conv"] == "d:alice:bob"
                r2 = await a2.ok("send", to="bob", cid="c1", body="changed")
                assert same_reply(r2, r1), (r1, r2)
                r3 = await a1.ok("send", conv="d:alice:bob", cid="c1", body="again")
                assert same_reply(r3, r1), (r1, r3)

                # 2. Concurrently on two connections: both frames written before
                # either reply is read.
                await a1.send_frame(
                    {"op": "send", "rid": 901, "to": "bob", "cid": "c2", "body": "x"}
                )
                await a2.send_frame(
                    {"op": "send", "rid": 902, "to": "bob", "cid": "c2", "body": "y"}
                )
                q1 = await reply_to(a1, 901)
                q2 = await reply_to(a2, 902)
                assert q1["op"] == q2["op"] == "ok", (q1, q2)
                assert same_reply(q1, q2), (q1, q2)
                assert q1["seq"] == 2

                # 3. Barrier: pings after the sends; every push of a committed send
                # was queued before the pong.
                for c in (bob, a1, a2):
                    await c.ok("ping")
                bob_msgs = [p for p in bob.pushes if p["op"] == "msg"]
                assert [(m["mid"], m["seq"], m["body"]) for m in bob_msgs] == [
                    (r1["mid"], 1, "first"),
                    (q1["mid"], 2, q1_body(q1, bob_msgs)),
                ], bob_msgs
                assert all("cid" not in m for m in bob_msgs)
                own = [p for p in a1.pushes + a2.pushes if p["op"] == "msg"]
                # a2 sees a1's c1 once; the repeats push nothing; c2 reaches at most
                # the other device of alice (whichever send was first is "the" send).
                assert [m["cid"] for m in own if m["cid"] == "c1"] == ["c1"], own
                assert [m for m in a1.pushes if m["op"] == "msg" and m["cid"] == "c1"] == []
                assert len([m for m in own if m["cid"] == "c2"]) <= 1, own
                bob.pushes.clear()

                h = await conv_history(bob, "d:alice:bob")
                assert [(m["seq"], m["mid"], m["body"]) for m in h] == [
                    (1, r1["mid"], "first"),
                    (2, q1["mid"], bob_msgs[1]["body"]),
                ]
                await close_all(opened)
                opened.clear()

            # 4. A new server on the same database: the same cid is still the same
            # message, delivered nowhere; a new cid continues the seqs.
            async with running_server(cfg, db_dsn) as info:
                port = info.tcp_port
                assert port is not None
                a1 = await connect(port, "alice", device="phone", register=False)
                bob = await connect(port, "bob", register=False)
                a2 = await connect(port, "alice", device="laptop", register=False)
                opened += [a1, bob, a2]
                r4 = await a1.ok("send", to="bob", cid="c1", body="after restart")
                assert same_reply(r4, r1), (r1, r4)
                r5 = await a2.ok("send", to="bob", cid="c2", body="after restart")
                assert same_reply(r5, q1), (q1, r5)
                for c in (bob, a1, a2):
                    await c.ok("ping")
                assert [p for p in bob.pushes + a1.pushes + a2.pushes if p["op"] == "msg"] == []
                r6 = await a1.ok("send", to="bob", cid="c3", body="new")
                assert r6["seq"] == 3
                assert r6["mid"] > q1["mid"]
                m = await bob.push("msg")
                assert (m["mid"], m["seq"], m["body"]) == (r6["mid"], 3, "new")
                await bob.ok("ping")
                assert [p for p in bob.pushes if p["op"] == "msg"] == []
                h = await conv_history(a1, "d:alice:bob")
                assert [(m["seq"], m["mid"], m["cid"]) for m in h] == [
                    (1, r1["mid"], "c1"),
                    (2, q1["mid"], "c2"),
                    (3, r6["mid"], "c3"),
                ]
                assert h[0]["body"] == "first"
                await close_all(opened)
                opened.clear()
        finally:
            await close_all(opened)


def q1_body(q1: dict[str, Any], msgs: list[dict[str, Any]]) -> str:
    """The body of the concurrent c2 send that won (either "x" or "y")."""
    body: str = next(m["body"] for m in msgs if m["mid"] == q1["mid"])
    assert body in ("x", "y")
    return body


async def reply_to(c: TestClient, rid: int) -> dict[str, Any]:
    """Read frames until the reply to ``rid`` (others are kept as pushes)."""
    while True:
        f = await c.recv_frame()
        if f.get("rid") == rid and f["op"] in ("ok", "error"):
            return f
        c.pushes.append(f)


async def test_same_cid_twice_in_one_batch(db_dsn: str) -> None:
    """Two sends with one cid written back to back (one TCP write, so they reach
    the writer in the same batch): one message, two identical replies."""
    cfg = test_config()
    opened: list[TestClient] = []
    with trio.fail_after(30):
        try:
            async with running_server(cfg, db_dsn) as info:
                port = info.tcp_port
                assert port is not None
                alice = await connect(port, "alice", register=True)
                bob = await connect(port, "bob", register=True)
                opened += [alice, bob]
                await befriend(alice, bob)
                r0 = await alice.ok("send", to="bob", cid="c0", body="zero")
                frames = [
                    {"op": "send", "rid": 501, "to": "bob", "cid": "c1", "body": "one"},
                    {"op": "send", "rid": 502, "to": "bob", "cid": "c1", "body": "other"},
                    {"op": "send", "rid": 503, "to": "bob", "cid": "c2", "body": "two"},
                    {"op": "send", "rid": 504, "to": "bob", "cid": "c2", "body": "two"},
                    {"op": "send", "rid": 505, "to": "bob", "cid": "c0", "body": "zero?"},
                ]
                await alice.send_raw(b"".join(encode_frame(f) for f in frames))
                replies = {rid: await reply_to(alice, rid) for rid in (501, 502, 503, 504, 505)}
                assert all(r["op"] == "ok" for r in replies.values()), replies
                assert same_reply(replies[501], replies[502])
                assert same_reply(replies[503], replies[504])
                assert same_reply(replies[505], r0)
                assert (replies[501]["seq"], replies[503]["seq"]) == (2, 3)
                await bob.ok("ping")
                await alice.ok("ping")
                msgs = [p for p in bob.pushes if p["op"] == "msg"]
                assert [(m["seq"], m["body"]) for m in msgs] == [
                    (1, "zero"),
                    (2, "one"),
                    (3, "two"),
                ]
                assert not [p for p in alice.pushes if p["op"] == "msg"]
                h = await conv_history(alice, "d:alice:bob")
                assert [(m["seq"], m["cid"], m["body"]) for m in h] == [
                    (1, "c0", "zero"),
                    (2, "c1", "one"),
                    (3, "c2", "two"),
                ]
                # The cid is per sender: bob's "c1" is another message.
                rb = await bob.ok("send", to="alice", cid="c1", body="bob's")
                assert rb["seq"] == 4
                assert rb["mid"] != replies[501]["mid"]
                await close_all(opened)
                opened.clear()
        finally:
            await close_all(opened)


async def test_repeat_gets_first_reply_after_block_or_unfriend(clients: Clients) -> None:
    """PROTOCOL §5: a repeat "at any later time" replies with the first send's
    mid/conv/seq/ts "whatever the repeat carries". A client that lost the reply
    resends; meanwhile the peer blocked (or unfriended) it. The message was stored
    and delivered, so the resend must not be reported as refused."""
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        await befriend(alice, bob)
        r1 = await alice.ok("send", to="bob", cid="c1", body="hi")
        await bob.ok("block", user="alice")
        r2 = await alice.request("send", to="bob", cid="c1", body="hi")
        await bob.ok("unblock", user="alice")
        await bob.ok("friend_remove", user="alice")
        r3 = await alice.request("send", to="bob", cid="c1", body="hi")
        assert r2["op"] == "ok", r2
        assert same_reply(r2, r1)
        assert r3["op"] == "ok", r3
        assert same_reply(r3, r1)


# ------------------------------------------------------------------ durability (subprocess)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """The ``imserver serve`` command in a subprocess, output in a log file."""

    def __init__(self, workdir: Path, env: dict[str, str], name: str) -> None:
        self.workdir = workdir
        self.extra_env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: trio.Process | None = None
        self.tcp_port = free_port()
        self.ws_port = free_port()
        self.http_port = free_port()

    async def start(self, timeout: float = 60.0) -> None:
        config = self.workdir / "empty.toml"
        config.write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.update(
            {
                "IMSERVER_TCP_PORT": str(self.tcp_port),
                "IMSERVER_WEBSOCKET_PORT": str(self.ws_port),
                "IMSERVER_HTTP_PORT": str(self.http_port),
                "IMSERVER_CHAT_REQUIRE_FRIENDSHIP": "false",
                "IMSERVER_RATE_SEND_PER_S": "100000",
                "IMSERVER_RATE_SEND_BURST": "100000",
                "IMSERVER_RATE_REQUESTS_PER_S": "100000",
                "IMSERVER_RATE_REQUESTS_BURST": "100000",
                "IMSERVER_AUTH_ARGON2_TIME_COST": "1",
                "IMSERVER_AUTH_ARGON2_MEMORY_KIB": "64",
                "IMSERVER_LOG_LEVEL": "warning",
                "IMSERVER_SERVER_SHUTDOWN_GRACE": "2",
            }
        )
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "imserver.cli", "--config", str(config), "serve"]
        with self._open_log() as log:
            self.proc = await trio.lowlevel.open_process(
                cmd, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        with trio.fail_after(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.log()}"
                    )
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.tcp_port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    def _open_log(self) -> BinaryIO:
        return open(self.log_path, "ab")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float) -> int:
        """SIGTERM; the exit status (fails if it takes longer than ``timeout``)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(timeout):
            return await self.proc.wait()
        raise AssertionError(f"server did not exit {timeout}s after SIGTERM:\n{self.log()}")

    async def cleanup(self) -> None:
        if self.proc is None:
            return
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()


async def durability_run(
    workdir: Path,
    env: dict[str, str],
    *,
    pairs: int,
    window: int,
    kill_after_acks: int,
    start_timeout: float,
    check_dsn: str | None = None,
) -> None:
    """Load, SIGKILL, restart, check, resend the unacked, check, SIGTERM under
    load (then, given ``check_dsn``, check the tables directly).

    ``pairs`` pairs of users send to each other (so each conversation has two
    concurrent senders) with ``window`` sends in flight each.
    """
    users = [f"s{i}" for i in range(2 * pairs)]
    peer = {u: users[i ^ 1] for i, u in enumerate(users)}
    convs = {u: f"d:{min(u, peer[u])}:{max(u, peer[u])}" for u in users}
    servers: list[ServerProcess] = []
    opened: list[TestClient] = []
    try:
        # 1. Load, then SIGKILL in the middle of it.
        first = ServerProcess(workdir, env, "server1")
        servers.append(first)
        await first.start(start_timeout)
        pipes: dict[str, Pipeline] = {}
        for u in users:
            c = await connect(first.tcp_port, u, register=True)
            opened.append(c)
            pipes[u] = Pipeline(c, peer[u], window=window)

        def acks() -> int:
            return sum(len(p.acked) for p in pipes.values())

        async with trio.open_nursery() as nursery:
            for u in users:
                nursery.start_soon(pipes[u].run, numbered(u))
            with trio.fail_after(60):
                await wait_until(lambda: acks() >= kill_after_acks, 0.005)
            await first.kill()
        assert first.proc is not None
        assert first.proc.returncode == -signal.SIGKILL
        await close_all(opened)
        opened.clear()
        for u, p in pipes.items():
            assert p.lost, f"{u}: connection survived SIGKILL?"
            assert not p.errors, f"{u}: errors {p.error_log[:5]}"
        acked = {u: dict(p.acked) for u, p in pipes.items()}
        sent = {u: set(p.sent) for u, p in pipes.items()}
        unacked = {u: p.unacked for u, p in pipes.items()}
        assert sum(map(len, acked.values())) >= kill_after_acks
        assert sum(map(len, unacked.values())) > 0, "nothing was in flight at the kill"

        # 2. Restart on the same database: every acked message is there.
        second = ServerProcess(workdir, env, "server2")
        servers.append(second)
        await second.start(start_timeout)
        cs = {u: await connect(second.tcp_port, u, register=False) for u in users}
        opened += cs.values()
        for conv in sorted(set(convs.values())):
            members = [u for u in users if convs[u] == conv]
            views = {u: await conv_history(cs[u], conv) for u in members}
            check_conv(conv, views, sent, acked, complete=False)

        # 3. Resend every unacknowledged cid (same cid, same body): one copy each.
        async with trio.open_nursery() as nursery:
            pipes = {u: Pipeline(cs[u], peer[u], window=window) for u in users}
            for u in users:
                nursery.start_soon(pipes[u].run, list(unacked[u]))
        for u, p in pipes.items():
            assert not p.lost
            assert set(p.acked) == set(unacked[u]), f"{u}: resends not all acked: {p.error_log[:5]}"
            acked[u].update(p.acked)
        # A few acked cids once more: the original reply, across the crash.
        for u in users:
            for cid in list(acked[u])[:3]:
                r = await cs[u].ok("send", to=peer[u], cid=cid, body=f"body of {cid}")
                assert same_reply(r, acked[u][cid]), (cid, r, acked[u][cid])
        total = 0
        for conv in sorted(set(convs.values())):
            members = [u for u in users if convs[u] == conv]
            views = {u: await conv_history(cs[u], conv) for u in members}
            total += check_conv(conv, views, sent, acked, complete=True)
        assert total == sum(map(len, sent.values()))

        # 4. SIGTERM under load: a clean exit (status 0) within a few seconds;
        # every session is kicked with "shutdown".
        pipes = {u: Pipeline(cs[u], peer[u], window=window) for u in users}
        async with trio.open_nursery() as nursery:
            for u in users:
                nursery.start_soon(pipes[u].run, numbered(f"{u}-t"))
            with trio.fail_after(30):
                await wait_until(lambda: sum(len(p.acked) for p in pipes.values()) >= 100)
            status = await second.terminate(timeout=15)
        assert status == 0, f"exit status {status}:\n{second.log()}"
        for u, p in pipes.items():
            assert p.lost
            assert {"op": "kicked", "reason": "shutdown"} in p.pushes, f"{u}: {p.pushes[-3:]}"
            assert set(p.errors.values()) <= {"unavailable"}, p.error_log[:5]
            acked[u].update(p.acked)
            sent[u].update(p.sent)
        if check_dsn is not None:
            await check_tables(check_dsn, sent, acked)
    finally:
        await close_all(opened)
        for s in servers:
            await s.cleanup()


async def check_tables(
    dsn: str, sent: dict[str, set[str]], acked: dict[str, dict[str, dict[str, Any]]]
) -> None:
    """The ``messages`` table itself: gap-free seqs, every acked row as acked."""

    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(
                await conn.fetch(
                    "SELECT conv, seq, mid, sender, cid, ts FROM messages ORDER BY conv, seq"
                )
            )
        finally:
            await conn.close()

    rows = await trio.to_thread.run_sync(lambda: asyncio.run(fetch()))
    seqs: dict[str, list[int]] = {}
    for r in rows:
        seqs.setdefault(r["conv"], []).append(r["seq"])
    for conv, ss in seqs.items():
        assert ss == list(range(1, len(ss) + 1)), f"{conv}: seqs are not 1..N"
    stored = {(r["sender"], r["cid"]): r for r in rows}
    assert len(stored) == len(rows)
    for u in sent:
        assert {c for s, c in stored if s == u} <= sent[u]
        for cid, ack in acked[u].items():
            r = stored.get((u, cid))
            assert r is not None, f"acknowledged {u}/{cid} not stored"
            got = (r["mid"], r["conv"], r["seq"], r["ts"])
            assert got == (ack["mid"], ack["conv"], ack["seq"], ack["ts"]), (cid, got, ack)


@pytest.mark.slow
async def test_sigkill_loses_nothing_acknowledged(db_dsn: str, tmp_path: Path) -> None:
    """Acceptance 3 on an external PostgreSQL (the test cluster): SIGKILL under load."""
    with trio.fail_after(120):
        await durability_run(
            tmp_path,
            {"IMSERVER_DSN": db_dsn},
            check_dsn=db_dsn,
            pairs=2,
            window=8,
            kill_after_acks=1000,
            start_timeout=30,
        )


def processes_in(path: Path) -> list[psutil.Process]:
    """Processes that name ``path`` on their command line or run in it."""
    found = []
    needle = str(path)
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            if needle in " ".join(proc.cmdline()) or proc.cwd().startswith(needle):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
async def test_sigkill_with_embedded_postgres(tmp_path: Path) -> None:
    """Acceptance 3 with the embedded PostgreSQL (fsync on): SIGKILL imserver, start
    it again on the same data directory; no postgres process is left behind."""
    data = tmp_path / "data"
    env = {"IMSERVER_SERVER_DATA_DIR": str(data), "IMSERVER_DATABASE_FSYNC": "true"}
    try:
        with trio.fail_after(150):
            await durability_run(
                tmp_path,
                env,
                pairs=1,
                window=8,
                kill_after_acks=200,
                start_timeout=90,
            )
            # SIGTERM stopped the embedded PostgreSQL too.
            with trio.move_on_after(10):
                await wait_until(lambda: not processes_in(data), 0.1)
            left = processes_in(data)
            assert not left, f"processes left running: {[p.cmdline() for p in left]}"
    finally:
        for proc in processes_in(data):
            with contextlib.suppress(psutil.Error):
                proc.kill()
