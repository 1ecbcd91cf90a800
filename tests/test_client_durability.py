"""The durability scenario through the client library.

A real ``imserver`` subprocess on an embedded PostgreSQL data directory;
two users send to each other through :class:`clients.Client` with several
sends in flight; the server is SIGKILLed mid-stream and started again on
the same data directory and ports. Nothing the applications did is
repeated by hand: the library reconnects, re-authenticates, resends what
was not acknowledged with its original ``cid`` and fills the gaps. The
result must lose nothing and duplicate nothing:

* every ``send()`` returns, and its ``mid/conv/seq/ts`` is what is stored;
* every sent ``cid`` is stored exactly once, seqs are 1..N without gaps;
* every receiver (the peer, and a second device of each sender on another
  transport) saw each message exactly once, in seq order.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from clients import Client, SendResult

from .client_helpers import PASSWORD, Recorder
from .test_durability import ServerProcess, processes_in

FAST = (0.0, 0.2, 0.5)
CONV = "d:a:b"


class Sender:
    """Sends ``n`` numbered messages with ``window`` sends in flight."""

    def __init__(
        self, client: Client, to: str, n: int, window: int, on_ack: Callable[[], None]
    ) -> None:
        self.client = client
        self.on_ack = on_ack
        self.to = to
        self.n = n
        self.window = window
        self.results: dict[str, SendResult] = {}
        self.started: list[str] = []
        self.acked = 0

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(self.window)

        async def one(cid: str) -> None:
            async with limiter:
                self.started.append(cid)
                r = await self.client.send(self.to, f"body of {cid}", cid=cid)
                self.results[cid] = r
                self.acked += 1
                self.on_ack()

        async with trio.open_nursery() as nursery:
            for i in range(self.n):
                nursery.start_soon(one, f"{self.client.user}-{self.client.device}-{i}")
                await trio.lowlevel.checkpoint()


async def open_one(
    nursery: trio.Nursery,
    server: ServerProcess,
    user: str,
    *,
    transport: str,
    encoding: str = "msgpack",
    device: str = "default",
    register: bool,
) -> Client:
    port = server.tcp_port if transport == "tcp" else server.ws_port
    c = Client(
        "127.0.0.1",
        port,
        transport=transport,  # type: ignore[arg-type]
        encoding=encoding,  # type: ignore[arg-type]
        device=device,
        reconnect_delays=FAST,
        request_timeout=30,
    )
    await c.start(nursery)
    if register:
        await c.register(user, PASSWORD)
    else:
        await c.login(user, PASSWORD)
    return c


def check_seen(name: str, seen: list[Any], stored: list[Any]) -> None:
    got = [(m.seq, m.mid, m.sender, m.body) for m in seen]
    want = [(m.seq, m.mid, m.sender, m.body) for m in stored]
    seqs = [s for s, _, _, _ in got]
    dups = sorted({s for s in seqs if seqs.count(s) > 1})
    assert not dups, f"{name} saw seqs twice: {dups[:10]}"
    assert seqs == sorted(seqs), f"{name} saw messages out of order"
    missing = sorted({s for s, *_ in want} - set(seqs))
    assert not missing, f"{name} never saw seqs {missing[:10]} ({len(missing)})"
    assert got == want, f"{name} saw something else than what is stored"


@pytest.mark.slow
async def test_sigkill_mid_stream_through_the_client(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"IMSERVER_SERVER_DATA_DIR": str(data), "IMSERVER_DATABASE_FSYNC": "true"}
    server = ServerProcess(tmp_path, env, "server")
    n, window = 150, 8
    try:
        with trio.fail_after(150):
            await server.start(90)
            async with trio.open_nursery() as nursery:
                a = await open_one(nursery, server, "a", transport="tcp", register=True)
                b = await open_one(nursery, server, "b", transport="ws", register=True)
                a2 = await open_one(
                    nursery,
                    server,
                    "a",
                    transport="ws",
                    encoding="json",
                    device="tablet",
                    register=False,
                )
                b2 = await open_one(
                    nursery, server, "b", transport="tcp", device="tablet", register=False
                )
                recs = {
                    name: Recorder(c) for name, c in [("a", a), ("b", b), ("a2", a2), ("b2", b2)]
                }
                for rec in recs.values():
                    nursery.start_soon(rec.run)
                # Kill once a third of the messages are acknowledged.
                kill_now = trio.Event()

                def on_ack() -> None:
                    if sum(s.acked for s in senders) >= (2 * n) // 3:
                        kill_now.set()

                senders = [Sender(a, "b", n, window, on_ack), Sender(b, "a", n, window, on_ack)]

                async with trio.open_nursery() as load:
                    for s in senders:
                        load.start_soon(s.run)
                    await kill_now.wait()
                    await server.kill()
                    assert server.proc is not None
                    assert server.proc.returncode == -signal.SIGKILL
                    in_flight = len(a.unacknowledged) + len(b.unacknowledged)
                    acked_at_kill = sum(s.acked for s in senders)
                    await server.start(90)
                # Every send returned, across the crash.
                assert in_flight > 0, "nothing was in flight at the kill"
                assert acked_at_kill < 2 * n
                total = 2 * n
                for s in senders:
                    assert len(s.results) == n
                assert a.unacknowledged == [] and b.unacknowledged == []

                # What is stored: each cid once, seqs 1..N, as acknowledged.
                stored = [m async for m in a.history_all(CONV)]
                assert [m.seq for m in stored] == list(range(1, total + 1))
                by_cid: dict[str, Any] = {}
                for m in stored:
                    assert m.sender in ("a", "b")
                    if m.sender == "a":
                        assert m.cid is not None
                        assert m.cid not in by_cid, f"cid {m.cid} stored twice"
                        by_cid[m.cid] = m
                for m in [m async for m in b.history_all(CONV)]:
                    if m.sender == "b":
                        assert m.cid is not None
                        assert m.cid not in by_cid, f"cid {m.cid} stored twice"
                        by_cid[m.cid] = m
                sent = {cid for s in senders for cid in s.started}
                assert set(by_cid) == sent
                for s in senders:
                    for cid, r in s.results.items():
                        m = by_cid[cid]
                        assert (r.mid, r.conv, r.seq, r.ts) == (m.mid, m.conv, m.seq, m.ts), cid
                        assert m.body == f"body of {cid}"

                # Every receiver saw every message exactly once, in order.
                for name, rec in recs.items():
                    await rec.wait_until(lambda rec=rec: len(rec.messages(CONV)) >= total, 30)
                    # A ping round trip: anything still queued would come before.
                    await rec.client.ping()
                    check_seen(name, rec.messages(CONV), stored)
                    assert rec.client.reconnects >= 1, f"{name} did not reconnect"
                for c in (a, b, a2, b2):
                    await c.aclose()
    finally:
        await server.cleanup()
        for proc in processes_in(data):
            with contextlib.suppress(psutil.Error):
                proc.kill()
