"""Time-based rules with Trio's MockClock, never with sleeps (acceptance 6).

The auth timeout involves no database, so it runs under
``MockClock(autojump_threshold=0)``. The other rules need PostgreSQL round
trips, during which an autojump clock would leap to the next deadline while
Trio waits on the database thread; those tests use a MockClock that moves only
when the test calls ``jump()``, and a writer that flushes at once
(``batch.max_delay_ms = 0``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from imserver.app import ServerInfo, serve
from imserver.config import Config

from .client import TestClient
from .conftest import befriend, test_config


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """A clock that stands still until the test jumps it (pytest-trio uses it for the run)."""
    return trio.testing.MockClock()


@pytest.fixture
def config() -> Config:
    return test_config(
        batch={"max_delay_ms": 0.0},
        auth={"token_ttl_s": 60},
        chat={"require_friendship": False},
    )


async def _start(nursery: trio.Nursery, cfg: Config, dsn: str) -> ServerInfo:
    info: ServerInfo = await nursery.start(serve, cfg, dsn)
    return info


async def test_auth_timeout_closes_silent_connection(
    autojump_clock: trio.testing.MockClock, config: Config, db_dsn: str
) -> None:
    async with trio.open_nursery() as nursery:
        info = await _start(nursery, config, db_dsn)
        try:
            c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
            start = trio.current_time()
            frames, _ = await c.closed()
            await c.aclose()
            elapsed = trio.current_time() - start
            assert [f["code"] for f in frames] == ["auth_timeout"]
            assert 5.0 <= elapsed < 6.0
            ws = await TestClient.ws(nursery, info.ws_port)  # type: ignore[arg-type]
            frames, code = await ws.closed()
            await ws.aclose()
            assert frames == [] and code == 1008  # encoding unknown: no error frame
        finally:
            info.shutdown()


@pytest.fixture
async def frozen_server(
    frozen_clock: trio.testing.MockClock, config: Config, db_dsn: str
) -> AsyncIterator[ServerInfo]:
    async with trio.open_nursery() as nursery:
        info = await _start(nursery, config, db_dsn)
        info.nursery = nursery  # type: ignore[attr-defined]
        info.opened = []  # type: ignore[attr-defined]
        try:
            yield info
        finally:
            for c in info.opened:  # type: ignore[attr-defined]
                with trio.move_on_after(1):
                    await c.aclose()
            info.shutdown()


async def _tcp(info: ServerInfo) -> TestClient:
    c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
    info.opened.append(c)  # type: ignore[attr-defined]
    return c


async def _user(info: ServerInfo, name: str, kind: str = "tcp") -> TestClient:
    if kind == "tcp":
        c = await _tcp(info)
    else:
        c = await TestClient.ws(info.nursery, info.ws_port)  # type: ignore[attr-defined]
        info.opened.append(c)  # type: ignore[attr-defined]
    await c.login(name)
    return c


async def _wait_kicked(
    c: TestClient, clock: trio.testing.MockClock
) -> tuple[list[dict], int | None]:
    return await c.closed()


@pytest.mark.parametrize("kind", ["tcp", "ws"])
async def test_heartbeat_timeout(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock, kind: str
) -> None:
    alice = await _user(frozen_server, "alice", kind)
    bob = await _user(frozen_server, "bob", kind)
    # Bob keeps pinging; alice goes silent.
    for _ in range(10):
        frozen_clock.jump(10)
        await bob.ok("ping")
        await trio.testing.wait_all_tasks_blocked()
    assert frozen_server.state.hub.devices("alice") == []
    frames, code = await alice.closed()
    assert {"op": "kicked", "reason": "timeout"} in frames
    if kind == "ws":
        assert code == 4006
    assert len(frozen_server.state.hub.devices("bob")) == 1
    await bob.ok("ping")


async def test_send_rate_limit(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock
) -> None:
    alice = await _user(frozen_server, "alice")
    await _user(frozen_server, "bob")
    for i in range(20):  # the burst
        await alice.ok("send", to="bob", cid=f"b{i}", body="x")
    r = await alice.request("send", to="bob", cid="over", body="x")
    assert r["code"] == "rate_limited"
    assert 0 < r["retry_after"] <= 0.1 + 1e-9
    frozen_clock.jump(0.1)
    r = await alice.ok("send", to="bob", cid="over", body="x")
    assert r["seq"] == 21
    r = await alice.request("send", to="bob", cid="over2", body="x")
    assert r["code"] == "rate_limited"
    frozen_clock.jump(2.0)  # 20 more tokens
    for i in range(20):
        await alice.ok("send", to="bob", cid=f"c{i}", body="x")


async def test_typing_rate_limit(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock
) -> None:
    alice = await _user(frozen_server, "alice")
    bob = await _user(frozen_server, "bob")
    for _ in range(5):
        await alice.ok("typing", to="bob", on=True)
    r = await alice.request("typing", to="bob", on=True)
    assert r["code"] == "rate_limited"
    frozen_clock.jump(0.5)
    await alice.ok("typing", to="bob", on=False)
    pushes = [await bob.push("typing") for _ in range(6)]
    assert pushes[-1] == {"op": "typing", "conv": "d:alice:bob", "user": "alice", "on": False}


async def test_token_expiry(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock
) -> None:
    alice = await _user(frozen_server, "alice")
    token = alice.token
    c = await _tcp(frozen_server)
    r = await c.ok("auth", token=token, device="tablet")
    assert r["user"] == "alice"
    frozen_clock.jump(61)
    c2 = await _tcp(frozen_server)
    r = await c2.request("auth", token=token, device="tablet2")
    assert r["code"] == "unauthorized" and "expired" in r["message"]
    # The connection stays open for another try.
    r = await c2.ok("login", user="alice", password="password1")
    assert r["token"] != token


async def test_login_rate_limit(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock
) -> None:
    await _user(frozen_server, "alice")
    c = await _tcp(frozen_server)
    codes = []
    for _ in range(10):
        r = await c.request("login", user="alice", password="wrong-password")
        codes.append(r["code"])
    # 10 per minute per user; the registration took one.
    assert codes.count("unauthorized") == 9 and codes[-1] == "rate_limited"
    frozen_clock.jump(3)  # half a token (10 a minute)
    c2 = await _tcp(frozen_server)
    r = await c2.request("login", user="alice", password="password1")
    assert r["code"] == "rate_limited"
    frozen_clock.jump(3.1)
    c3 = await _tcp(frozen_server)
    await c3.ok("login", user="alice", password="password1")


__all__ = ["befriend"]


async def test_recall_window(
    frozen_server: ServerInfo, frozen_clock: trio.testing.MockClock
) -> None:
    """Recall is measured by the server clock against the message's ts (issue 3, acceptance 4)."""
    alice = await _user(frozen_server, "alice")
    bob = await _user(frozen_server, "bob")

    async def wait(seconds: float) -> None:
        # Step in less than the heartbeat timeout, pinging, so no one is kicked.
        for _ in range(3):
            frozen_clock.jump(seconds / 3)
            for c in (alice, bob):
                await c.ok("ping")

    early = await alice.ok("send", to="bob", cid="early", body="x")
    await wait(60)
    late = await alice.ok("send", to="bob", cid="late", body="y")
    assert late["ts"] - early["ts"] == 60_000
    await wait(60.5)  # early is 120.5 s old, late 60.5 s
    r = await alice.request("recall", mid=early["mid"])
    assert r["code"] == "forbidden" and "window" in r["message"]
    await alice.ok("recall", mid=late["mid"])
    hist = await bob.ok("history", conv=early["conv"])
    assert [m.get("recalled", False) for m in hist["msgs"][:2]] == [False, True]
    assert hist["msgs"][0]["body"] == "x"
