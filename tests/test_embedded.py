"""Tests for imserver.storage.embedded: the embedded PostgreSQL lifecycle.

initdb takes a few seconds, so most tests start from a copy of one cluster initialized once
per session.  Every test stops its clusters in ``finally``, and an autouse fixture fails the
test if any process still runs in (or names) the test's tmp directory.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from imserver.storage.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    create_database,
    drop_database,
)
from tests.pgcluster import start_test_cluster

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def query(dsn: str, sql: str, *args: Any, database: str | None = None) -> list[asyncpg.Record]:
    """Run one query with asyncpg and return its rows."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, database=database)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def execute(dsn: str, sql: str, *, database: str | None = None) -> None:
    """Run SQL commands (possibly several) with asyncpg."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn, database=database)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def alive(pid: int) -> bool:
    """True if ``pid`` runs (zombies count as dead: PID 1 here may not reap orphans)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_dead(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is dead; True if it died within ``timeout``."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def processes_under(path: Path) -> list[str]:
    """Live processes whose working directory or command line mentions ``path``."""
    needle = str(path)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or info["pid"] == os.getpid():
            continue
        cmdline = " ".join(info["cmdline"] or [])
        if needle in cmdline or needle in (info["cwd"] or ""):
            found.append(f"{info['pid']}: {cmdline}")
    return found


def spawn_host(data_dir: Path, *, pdeathsig: bool) -> tuple[subprocess.Popen[str], int]:
    """Run a separate Python process that starts a cluster on ``data_dir``, creates the
    database ``written_before``, prints the postmaster PID and sleeps.  Returns (host, pid).
    """
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from imserver.storage.embedded import EmbeddedPostgres, create_database
        pg = EmbeddedPostgres(Path({str(data_dir)!r}), fsync=False, _pdeathsig={pdeathsig!r})
        pg.start()
        create_database(pg.dsn, "written_before")
        print(pg.pid, flush=True)
        time.sleep(120)
        """
    )
    host = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert host.stdout is not None
    line = host.stdout.readline()
    host.stdout.close()
    if not line.strip():
        host.kill()
        host.wait()
        pytest.fail("host process did not start the cluster")
    return host, int(line)


def databases(dsn: str) -> set[str]:
    """Names of the databases in the cluster."""
    return {r["datname"] for r in query(dsn, "select datname from pg_database")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    """Fail if a process still runs in the test's tmp directory after the test."""
    yield
    deadline = time.monotonic() + 5
    while (left := processes_under(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def initialized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stopped, initialized cluster directory to copy (initdb is the slow part)."""
    data_dir = tmp_path_factory.mktemp("template") / "pg"
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
    finally:
        pg.stop()
    return data_dir


@pytest.fixture
def data_dir(initialized_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the initialized cluster directory."""
    dest = tmp_path / "pg"
    shutil.copytree(initialized_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("log"))
    return dest


# --------------------------------------------------------------------------- tests


def test_fresh_start_query_restart_persists(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "new" / "pg", fsync=False)
    assert pg.pid is None
    pg.stop()  # safe if never started
    try:
        dsn = pg.start()
        assert dsn == pg.dsn == f"postgresql://postgres@/postgres?host={pg.socket_dir}"
        assert pg.socket_dir == pg.data_dir  # short enough for sun_path
        assert stat.S_IMODE(pg.data_dir.stat().st_mode) == 0o700
        assert pg.start() == dsn  # idempotent while running
        assert query(dsn, "select 1 as one")[0]["one"] == 1
        execute(dsn, "create table t (x int); insert into t values (42)")
        rows = query(dsn, "select current_setting('fsync') f, current_setting('max_connections') m")
        assert (rows[0]["f"], rows[0]["m"]) == ("off", "100")
        old_pid = pg.pid
        assert old_pid is not None
        pg.stop()
        assert pg.pid is None
        assert not alive(old_pid)
        pg.stop()  # idempotent
        pg.start()
        assert [r["x"] for r in query(pg.dsn, "select x from t")] == [42]
    finally:
        pg.stop()
    assert (pg.data_dir / "log" / "postgres.log").stat().st_size > 0


def test_long_path_uses_private_tmp_socket_dir(data_dir: Path, tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100) / "pg"
    long_dir.parent.mkdir()
    data_dir.rename(long_dir)
    assert len(str(long_dir / ".s.PGSQL.5432")) > 107
    pg = EmbeddedPostgres(long_dir, fsync=False)
    try:
        with pg:
            sock = pg.socket_dir
            assert str(sock).startswith("/tmp/imserver-pg-")
            st = os.lstat(sock)
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o700
            assert st.st_uid == os.geteuid()
            assert stat.S_ISSOCK(os.lstat(sock / ".s.PGSQL.5432").st_mode)
            assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
            assert EmbeddedPostgres(long_dir).socket_dir == sock  # stable per data dir
    finally:
        pg.stop()
    assert not pg.socket_dir.exists()  # removed at stop


def test_no_tcp_no_system_user(data_dir: Path) -> None:
    passwd_before = Path("/etc/passwd").read_text()
    try:
        pwd.getpwnam("embedded_postgres")
        had_user = True
    except KeyError:
        had_user = False
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
        assert pg.pid is not None
        postmaster = psutil.Process(pg.pid)
        for proc in [postmaster, *postmaster.children(recursive=True)]:
            assert proc.net_connections(kind="inet") == []
        lines = (data_dir / "postmaster.pid").read_text().split("\n")
        assert lines[4] == str(data_dir)  # socket directory
        assert lines[5] == ""  # listen address: none
        row = query(pg.dsn, "select current_setting('listen_addresses') l")[0]
        assert row["l"] == ""
        if os.geteuid() == 0:
            # the server runs as uid 65534 inside its user namespace; root outside
            assert postmaster.uids().real == 0
            uid_map = Path(f"/proc/{pg.pid}/uid_map").read_text().split()
            assert uid_map == ["65534", "0", "1"]
            assert data_dir.stat().st_uid == 0
    finally:
        pg.stop()
    assert Path("/etc/passwd").read_text() == passwd_before
    if not had_user:
        with pytest.raises(KeyError):
            pwd.getpwnam("embedded_postgres")


def test_pdeathsig_stops_server_when_host_is_killed(data_dir: Path) -> None:
    host, pid = spawn_host(data_dir, pdeathsig=True)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        assert alive(pid)
        host.kill()
        host.wait()
        # The kernel sends SIGINT (fast shutdown) to the postmaster when its parent dies.
        assert wait_dead(pid, 15), "postmaster survived its parent: PDEATHSIG not effective"
        pg.start()
        assert "written_before" in databases(pg.dsn)
    finally:
        pg.stop()
        host.kill()
        host.wait()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_orphaned_postmaster_is_stopped_and_replaced(data_dir: Path) -> None:
    host, pid = spawn_host(data_dir, pdeathsig=False)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        host.kill()
        host.wait()
        time.sleep(0.5)
        assert alive(pid), "without PDEATHSIG the postmaster should outlive its parent"
        pg.start()
        assert not alive(pid)
        assert pg.pid != pid
        assert "written_before" in databases(pg.dsn)
        log = (data_dir / "log" / "postgres.log").read_text()
        assert "received fast shutdown request" in log  # the orphan got SIGINT first
    finally:
        pg.stop()
        host.kill()
        host.wait()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _stale_pidfile(data_dir: Path, pid: int) -> None:
    """Write postmaster.pid (and socket lock, socket, .handle_pids.json) naming ``pid``."""
    content = f"{pid}\n{data_dir}\n1700000000\n5432\n{data_dir}\n\n  1234  5678\nready   \n"
    (data_dir / "postmaster.pid").write_text(content)
    (data_dir / ".s.PGSQL.5432.lock").write_text(f"{pid}\n{data_dir}\n1700000000\n5432\n")
    (data_dir / ".s.PGSQL.5432").write_text("")  # a stale non-socket file in its place
    (data_dir / ".handle_pids.json").write_text(f'{{"{pid}": "x"}}')


def test_stale_pidfile_with_dead_pid(data_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _stale_pidfile(data_dir, dead.pid)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
        assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
        assert not (data_dir / ".handle_pids.json").exists()
    finally:
        pg.stop()


def test_stale_pidfile_with_live_unrelated_process(data_dir: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        _stale_pidfile(data_dir, sleeper.pid)
        pg.start()
        assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
        time.sleep(0.1)
        assert sleeper.poll() is None, "an unrelated process was signalled"
    finally:
        pg.stop()
        sleeper.kill()
        sleeper.wait()


def test_stale_pidfile_naming_another_clusters_postmaster(data_dir: Path, tmp_path: Path) -> None:
    """A reused PID can belong to *another* postgres: it must not be touched either."""
    other_dir = tmp_path / "other"
    shutil.copytree(data_dir, other_dir, symlinks=True)
    other = EmbeddedPostgres(other_dir, fsync=False)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        other.start()
        assert other.pid is not None
        _stale_pidfile(data_dir, other.pid)
        pg.start()
        assert other.pid is not None
        assert query(other.dsn, "select 1 as one")[0]["one"] == 1
        assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
    finally:
        pg.stop()
        other.stop()


def test_second_instance_on_same_dir_is_refused(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir, fsync=False)
    second = EmbeddedPostgres(data_dir, fsync=False)
    try:
        first.start()
        with pytest.raises(EmbeddedPostgresError, match="in use by another imserver") as info:
            second.start()
        assert str(data_dir) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        assert second.pid is None
        assert query(first.dsn, "select 1 as one")[0]["one"] == 1
        first.stop()
        second.start()  # lock released by stop()
        assert query(second.dsn, "select 1 as one")[0]["one"] == 1
    finally:
        first.stop()
        second.stop()


def test_startup_failure_reports_log_tail_and_releases_lock(data_dir: Path) -> None:
    bad = EmbeddedPostgres(data_dir, fsync=False, extra_settings={"shared_buffers": "lots"})
    with pytest.raises(EmbeddedPostgresError, match="exited during startup") as info:
        bad.start()
    assert "shared_buffers" in str(info.value)  # the server's complaint, from the log
    assert bad.pid is None
    good = EmbeddedPostgres(data_dir, fsync=False, extra_settings={"work_mem": "8MB"})
    try:
        good.start()
        assert query(good.dsn, "select current_setting('work_mem') w")[0]["w"] == "8MB"
    finally:
        good.stop()


def test_reserved_settings_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="listen_addresses"):
        EmbeddedPostgres(tmp_path, extra_settings={"listen_addresses": "*"})


def test_refuses_to_initdb_into_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "pg").mkdir(mode=0o700)
    (tmp_path / "pg" / "precious.txt").write_text("keep me")
    pg = EmbeddedPostgres(tmp_path / "pg", fsync=False)
    with pytest.raises(EmbeddedPostgresError, match="not empty"):
        pg.start()
    assert (tmp_path / "pg" / "precious.txt").read_text() == "keep me"
    pg.stop()


def test_test_cluster_and_database_helpers(initialized_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(initialized_dir, tmp_path / "pg", symlinks=True)
    pg = start_test_cluster(tmp_path)
    try:
        assert pg.data_dir == tmp_path / "pg"
        create_database(pg.dsn, "tmpl")
        execute(pg.dsn, "create table t (x int); insert into t values (7)", database="tmpl")
        create_database(pg.dsn, 'clone "1"', template="tmpl")
        assert [r["x"] for r in query(pg.dsn, "select x from t", database='clone "1"')] == [7]
        drop_database(pg.dsn, 'clone "1"')
        drop_database(pg.dsn, 'clone "1"')  # no error if missing
        assert databases(pg.dsn) >= {"tmpl", "postgres"}
        assert 'clone "1"' not in databases(pg.dsn)
        with pytest.raises(EmbeddedPostgresError, match="already exists"):
            create_database(pg.dsn, "tmpl")
    finally:
        pg.stop()
