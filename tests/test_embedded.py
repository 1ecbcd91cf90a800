"""Tests for imserver.storage.embedded: the embedded PostgreSQL lifecycle.

initdb takes a few seconds, so most tests start from a copy of one cluster initialized once
per session (on tmpfs when available).  The first test does a real initdb in pytest's
tmp_path.  Every test stops its clusters in ``finally``, and an autouse fixture fails the
test if any process still runs in (or names) the test's directories.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from imserver.storage import embedded
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
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
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
        status: str = psutil.Process(pid).status()
        return bool(status != psutil.STATUS_ZOMBIE)
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


@pytest.fixture(scope="session")
def scratch_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Session directory for cluster copies: on tmpfs (/dev/shm) when available, because a
    cluster is ~1300 files and file creation on a busy disk can take many seconds."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        base = Path(tempfile.mkdtemp(prefix="imserver-test-", dir=shm))
    else:
        base = tmp_path_factory.mktemp("scratch")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def work_dir(scratch_base: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A per-test scratch directory (removed afterwards).  After the test, fail if a process
    still runs in (or names) it or the test's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix=request.node.name[:24] + "-", dir=scratch_base))
    yield path
    deadline = time.monotonic() + 5
    while (left := processes_under(tmp_path) + processes_under(path)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def initialized_dir(scratch_base: Path) -> Path:
    """A stopped, initialized cluster directory to copy (initdb is the slow part)."""
    data_dir = scratch_base / "template" / "pg"
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
    finally:
        pg.stop()
    return data_dir


@pytest.fixture
def data_dir(initialized_dir: Path, work_dir: Path) -> Path:
    """A private copy of the initialized cluster directory (``work_dir/"pg"``)."""
    dest = work_dir / "pg"
    shutil.copytree(initialized_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("log"))
    return dest


# --------------------------------------------------------------------------- tests


def test_fresh_start_query_restart_persists(tmp_path: Path) -> None:
    """initdb + start in a new directory; unix socket only; no system user; data persists."""
    passwd_before = Path("/etc/passwd").read_text()
    try:
        pwd.getpwnam("embedded_postgres")
        had_user = True
    except KeyError:
        had_user = False
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
        rows = query(
            dsn,
            "select current_setting('fsync') f, current_setting('max_connections') m,"
            " current_setting('listen_addresses') l, current_setting('server_encoding') e",
        )
        assert tuple(rows[0].values()) == ("off", "100", "", "UTF8")

        # No TCP: no inet socket in any server process, no listen address in postmaster.pid.
        assert pg.pid is not None
        assert os.getsid(pg.pid) == pg.pid  # own session: a terminal's Ctrl-C doesn't reach it
        postmaster = psutil.Process(pg.pid)
        for proc in [postmaster, *postmaster.children(recursive=True)]:
            try:
                assert proc.net_connections(kind="inet") == []
            except (psutil.NoSuchProcess, FileNotFoundError):
                assert proc is not postmaster  # a backend that exited meanwhile
        lines = (pg.data_dir / "postmaster.pid").read_text().split("\n")
        assert lines[4] == str(pg.socket_dir)
        assert lines[5] == ""  # listen address: none
        if os.geteuid() == 0:
            # uid 65534 inside its own user namespace, root outside; files owned by root.
            assert postmaster.uids().real == 0
            uid_map = Path(f"/proc/{pg.pid}/uid_map").read_text().split()
            assert uid_map == ["65534", "0", "1"]
            assert all(p.stat().st_uid == 0 for p in pg.data_dir.iterdir())

        old_pid = pg.pid
        pg.stop()
        assert pg.pid is None
        assert not alive(old_pid)
        pg.stop()  # idempotent
        pg.start()
        assert [r["x"] for r in query(pg.dsn, "select x from t")] == [42]
    finally:
        pg.stop()
    assert (pg.data_dir / "log" / "postgres.log").stat().st_size > 0
    assert Path("/etc/passwd").read_text() == passwd_before
    if not had_user:
        with pytest.raises(KeyError):
            pwd.getpwnam("embedded_postgres")


def test_long_path_uses_private_tmp_socket_dir(data_dir: Path, work_dir: Path) -> None:
    """A data directory too long for sun_path gets its socket in a private /tmp dir."""
    long_dir = work_dir / ("d" * 100) / "pg"
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


@pytest.mark.slow
def test_pdeathsig_stops_server_when_host_is_killed(data_dir: Path) -> None:
    """SIGKILL of the host process: the kernel delivers the death signal (SIGINT, fast
    shutdown) to the postmaster, and a later start() finds the data."""
    host, pid = spawn_host(data_dir, pdeathsig=True)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        assert alive(pid)
        host.kill()
        host.wait()
        # The kernel sends SIGINT (fast shutdown) to the postmaster when its parent dies.
        assert wait_dead(pid, 15), "postmaster survived its parent: PDEATHSIG not effective"
        log = (data_dir / "log" / "postgres.log").read_text()
        assert "received fast shutdown request" in log
        pg.start()
        assert "written_before" in databases(pg.dsn)
    finally:
        pg.stop()
        host.kill()
        host.wait()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_orphaned_postmaster_is_stopped_and_replaced(data_dir: Path) -> None:
    """A postmaster that outlived its host (no death signal) is recognized via
    postmaster.pid and shut down by the next start(), which then serves the same data."""
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


def test_start_from_other_thread_sets_no_death_signal(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PDEATHSIG fires when the forking *thread* exits, so it is not set off the main thread."""
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="imserver.storage.embedded"),
            ThreadPoolExecutor(1) as pool,  # its worker thread exits at the end
        ):
            pool.submit(pg.start).result()
        assert "outside the main thread" in caplog.text
        time.sleep(0.3)  # the starting thread is gone; the server must not have been stopped
        assert pg.pid is not None
        assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
    finally:
        pg.stop()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_non_root_runs_binaries_directly(data_dir: Path) -> None:
    """As a non-root user (simulated: uid 65534 in a user namespace) no namespace is made."""
    code = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from imserver.storage.embedded import EmbeddedPostgres, create_database
        assert os.geteuid() == 65534
        pg = EmbeddedPostgres(Path({str(data_dir)!r}), fsync=False)
        try:
            pg.start()
            uid_map = Path(f"/proc/{{pg.pid}}/uid_map").read_text().split()
            assert uid_map == ["65534", "0", "1"], uid_map  # ours, not a nested one
            create_database(pg.dsn, "as_nobody")
        finally:
            pg.stop()
        print("ok")
        """
    )
    res = subprocess.run(
        ["unshare", "--user", "--map-user=65534", "--map-group=65534", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )
    assert res.stdout.strip() == "ok", res.stderr
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
        assert "as_nobody" in databases(pg.dsn)
    finally:
        pg.stop()


def _stale_pidfile(data_dir: Path, pid: int) -> None:
    """Write postmaster.pid (and socket lock, socket, .handle_pids.json) naming ``pid``."""
    content = f"{pid}\n{data_dir}\n1700000000\n5432\n{data_dir}\n\n  1234  5678\nready   \n"
    (data_dir / "postmaster.pid").write_text(content)
    (data_dir / ".s.PGSQL.5432.lock").write_text(f"{pid}\n{data_dir}\n1700000000\n5432\n")
    (data_dir / ".s.PGSQL.5432").write_text("")  # a stale non-socket file in its place
    (data_dir / ".handle_pids.json").write_text(f'{{"{pid}": "x"}}')


def test_stale_pidfile_never_signals_unrelated_processes(data_dir: Path, work_dir: Path) -> None:
    """postmaster.pid naming a dead PID, a live unrelated process, or a live *postgres* of
    another data directory: start works and nothing is signalled."""
    pg = EmbeddedPostgres(data_dir, fsync=False)
    dead = subprocess.Popen(["true"])
    dead.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    other_dir = work_dir / "other"
    other_dir.mkdir()
    # argv[0] "postgres", "-D <other dir>", cwd elsewhere: looks like another cluster's postmaster
    other_postgres = subprocess.Popen(
        ["postgres", "-c", "sleep 60; :", "-D", str(other_dir)],
        executable="/bin/sh",
        cwd=other_dir,
        start_new_session=True,
    )
    try:
        for pid in (dead.pid, sleeper.pid, other_postgres.pid):
            _stale_pidfile(data_dir, pid)
            pg.start()
            assert query(pg.dsn, "select 1 as one")[0]["one"] == 1
            assert not (data_dir / ".handle_pids.json").exists()
            pg.stop()
        time.sleep(0.1)
        assert sleeper.poll() is None, "an unrelated process was signalled"
        assert other_postgres.poll() is None, "another cluster's postmaster was signalled"
    finally:
        pg.stop()
        sleeper.kill()
        sleeper.wait()
        os.killpg(other_postgres.pid, signal.SIGKILL)  # the shell and its sleep
        other_postgres.wait()


def test_second_instance_refused_and_lock_released(data_dir: Path) -> None:
    """A second EmbeddedPostgres on the same directory is refused while the first runs; the
    lock is released by stop() and by a failed start()."""
    first = EmbeddedPostgres(data_dir, fsync=False)
    second = EmbeddedPostgres(data_dir, fsync=False, extra_settings={"work_mem": "8MB"})
    bad = EmbeddedPostgres(data_dir, fsync=False, extra_settings={"shared_buffers": "lots"})
    try:
        first.start()
        with pytest.raises(EmbeddedPostgresError, match="in use by another imserver") as info:
            second.start()
        assert str(data_dir) in str(info.value)
        assert f"pid {os.getpid()}" in str(info.value)
        assert second.pid is None
        assert query(first.dsn, "select 1 as one")[0]["one"] == 1
        first.stop()

        with pytest.raises(EmbeddedPostgresError, match="exited during startup") as info:
            bad.start()
        assert "shared_buffers" in str(info.value)  # the server's complaint, from the log
        assert bad.pid is None

        second.start()
        assert query(second.dsn, "select current_setting('work_mem') w")[0]["w"] == "8MB"
    finally:
        first.stop()
        second.stop()
        bad.stop()


def test_stop_escalates_when_fast_shutdown_hangs(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A postmaster that does not react to SIGINT (here: SIGSTOPped) is SIGKILLed after the
    timeouts; the next start recovers the crashed cluster."""
    monkeypatch.setattr(embedded, "_ESCALATION_WAIT", 0.3)
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
        execute(pg.dsn, "create table t (x int); insert into t values (1)")
        pid = pg.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        pg.stop(timeout=0.3)
        assert time.monotonic() - started < 10
        assert pg.pid is None
        assert not alive(pid)
        pg.start()
        assert [r["x"] for r in query(pg.dsn, "select x from t")] == [1]
    finally:
        pg.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the user namespace is only used as root")
def test_user_namespace_failure_is_reported(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If unshare() fails (e.g. user namespaces forbidden in a container), start() says so."""
    monkeypatch.setattr(embedded, "_CLONE_NEWUSER", -1)  # invalid flags: EINVAL
    pg = EmbeddedPostgres(data_dir, fsync=False)
    with pytest.raises(EmbeddedPostgresError, match="user namespace") as info:
        pg.start()
    assert "unshare(CLONE_NEWUSER) failed" in str(info.value)  # from the log tail
    monkeypatch.undo()
    try:
        pg.start()  # the lock was released
    finally:
        pg.stop()


def test_reserved_settings_rejected(tmp_path: Path) -> None:
    """Settings the DSN depends on cannot be overridden."""
    with pytest.raises(ValueError, match="listen_addresses"):
        EmbeddedPostgres(tmp_path, extra_settings={"listen_addresses": "*"})


def test_refuses_to_initdb_into_foreign_directory(tmp_path: Path) -> None:
    """A non-empty directory without PG_VERSION is left alone."""
    (tmp_path / "pg").mkdir(mode=0o700)
    (tmp_path / "pg" / "precious.txt").write_text("keep me")
    pg = EmbeddedPostgres(tmp_path / "pg", fsync=False)
    with pytest.raises(EmbeddedPostgresError, match="not empty"):
        pg.start()
    assert (tmp_path / "pg" / "precious.txt").read_text() == "keep me"
    pg.stop()


def test_test_cluster_and_database_helpers(data_dir: Path) -> None:
    """tests/pgcluster.start_test_cluster and the create/drop database helpers."""
    pg = start_test_cluster(data_dir.parent)
    try:
        assert pg.data_dir == data_dir
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
