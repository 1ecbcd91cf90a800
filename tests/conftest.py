"""Shared fixtures: one embedded PostgreSQL per test run, one database per test.

The cluster starts once in a synchronous session-scoped fixture (Trio fixtures
must be function-scoped, and the embedded server must start from the main
thread). A template database is migrated once; every test gets its own
``CREATE DATABASE ... TEMPLATE`` clone, so tests never see each other's rows.
The test cluster runs with fsync off for speed; the server's default keeps it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio

from imserver.app import ServerInfo, serve
from imserver.config import Config, from_mapping
from imserver.storage.embedded import EmbeddedPostgres

from .client import TestClient
from .pgcluster import start_test_cluster

TEMPLATE = "imtest_template"
_db_numbers = itertools.count(1)


def _dsn_for(dsn: str, db: str) -> str:
    # DSN form: postgresql://postgres@/postgres?host=/socket/dir
    head, _, query = dsn.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{db}?{query}" if query else f"{base}/{db}"


def _admin(dsn: str, *sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for s in sql:
                await conn.execute(s)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """The test run's PostgreSQL (fsync off), with a migrated template database."""
    external = os.environ.get("IMSERVER_TEST_DSN")
    if external:
        pytest.skip("external test DSN is not supported by this suite")
    # tmpfs when there is one: a cluster is ~1,300 files, and creating them on a
    # busy disk took 30+ s here against well under a second on /dev/shm.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        base = Path(tempfile.mkdtemp(prefix="imserver-test-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("db")
    cluster = start_test_cluster(base)
    try:
        _admin(cluster.dsn, f"DROP DATABASE IF EXISTS {TEMPLATE}", f"CREATE DATABASE {TEMPLATE}")

        async def migrate() -> None:
            from imserver.storage.db import Storage

            storage = Storage(_dsn_for(cluster.dsn, TEMPLATE), pool_size=1)
            await storage.open()
            try:
                await storage.migrate()
            finally:
                await storage.aclose()

        trio.run(migrate)
        yield cluster
    finally:
        cluster.stop()
        if base.parent == shm:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def db_dsn(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"imtest_{os.getpid()}_{next(_db_numbers)}"
    _admin(pg_cluster.dsn, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield _dsn_for(pg_cluster.dsn, name)
    finally:
        _admin(pg_cluster.dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_config(**sections: dict[str, Any]) -> Config:
    """Defaults for tests: ephemeral ports, fast argon2, short writer backoff."""
    raw: dict[str, dict[str, Any]] = {
        "tcp": {"port": 0},
        "websocket": {"port": 0},
        "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 64, "min_password_len": 8},
        "batch": {"retry_backoff": 0.05},
        "server": {"shutdown_grace": 2.0},
        "http": {"port": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_mapping(raw, env={})


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def config() -> Config:
    """The server configuration for this test (override by parametrizing or replacing)."""
    return test_config()


@contextlib.asynccontextmanager
async def running_server(cfg: Config, dsn: str) -> AsyncIterator[ServerInfo]:
    """An in-process server; on exit it is shut down and :func:`serve` has returned."""
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, cfg, dsn)
        try:
            yield info
        finally:
            info.shutdown()


@pytest.fixture
async def server(config: Config, db_dsn: str) -> AsyncIterator[ServerInfo]:
    """A running server on ephemeral ports, shut down gracefully after the test."""
    async with running_server(config, db_dsn) as info:
        yield info


class Clients:
    """Opens test clients and closes them at the end of the test."""

    def __init__(self, info: ServerInfo, nursery: trio.Nursery) -> None:
        self.info = info
        self.nursery = nursery
        self.opened: list[TestClient] = []

    async def connect(self, kind: str = "tcp") -> TestClient:
        if kind == "tcp":
            assert self.info.tcp_port is not None
            c = await TestClient.tcp(self.info.tcp_port)
        else:
            assert self.info.ws_port is not None
            c = await TestClient.ws(self.nursery, self.info.ws_port, text=(kind == "ws-json"))
        self.opened.append(c)
        return c

    async def user(self, name: str, kind: str = "tcp", device: str = "default") -> TestClient:
        c = await self.connect(kind)
        await c.login(name, device=device)
        return c


@pytest.fixture
async def clients(server: ServerInfo) -> AsyncIterator[Clients]:
    async with trio.open_nursery() as nursery:
        cs = Clients(server, nursery)
        try:
            yield cs
        finally:
            with trio.move_on_after(5):
                for c in cs.opened:
                    try:
                        await c.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            nursery.cancel_scope.cancel()


async def befriend(a: TestClient, b: TestClient) -> None:
    """Make a and b friends (a requests, b accepts)."""
    await a.ok("friend_request", to=b.user, note="hi")
    await b.ok("friend_accept", user=a.user)
    # Drain the friend pushes each side gets.
    await b.push("friend")
    await a.push("friend")


__all__ = ["Clients", "Path", "befriend", "running_server", "test_config"]
