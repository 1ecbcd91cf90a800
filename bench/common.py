"""What every bench scenario shares.

* :class:`TcpConn` / :class:`WsConn`: one client connection with batched
  ``send_frames`` and a ``receive`` that returns every frame that arrived.
* :func:`open_authed`: connect and authenticate a user (cached token, else
  ``register``, else ``login``).
* :func:`run_workers`: split a scenario over worker processes (each its own
  ``trio.run``), start them on one common clock, print progress, collect
  their results.
* :class:`SpawnedServer`: the server under test as a subprocess pinned to
  its own cores.
* Result helpers: latency percentiles, environment facts, the human summary
  and the one JSON line.

Clock: every timestamp is ``time.perf_counter_ns()``. On Linux that is
``CLOCK_MONOTONIC``, which is system-wide, so the parent and all workers
share one time line (the parent hands the workers ``t0`` in that clock).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import datetime
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import trio

from protocol.codec import NEED_DATA, FrameDecoder, decode_ws, encode_ws, frame_prefix, pack

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEFAULT_CONFIG = BENCH_DIR / "bench.toml"
DATA_DIR = BENCH_DIR / "data"
TOKEN_CACHE = DATA_DIR / "tokens.json"
SERVER_LOG = DATA_DIR / "server.log"

DEFAULT_PORTS = {"tcp": 7700, "ws": 7701, "ws-json": 7701}
PASSWORD = "bench-password-1"
DEVICE = "bench"
MAX_DRAIN_S = 5.0
# First run on a fresh data dir registers every user: one argon2 hash each on
# the server (~0.3 s here on one core), so 200 users take about a minute.
SETUP_TIMEOUT_S = 240.0
HEARTBEAT_S = 15.0
SATURATED_PCT = 85.0
# CPU use by other processes on the pinned CPUs (% of one core over the
# window) above which a result is flagged as disturbed.
CONTENDED_PCT = 10.0
RECEIVE_BYTES = 262144
MAX_FRAME = 1 << 24

NS = 1_000_000_000


class BenchError(Exception):
    """A run cannot go on; the message says why (printed as one line)."""


class Closed(Exception):
    """The server closed the connection."""

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"connection closed (code={code} reason={reason})")
        self.code = code
        self.reason = reason


# ----------------------------------------------------------------- safety


def check_loopback(host: str) -> None:
    """Refuse any host that does not resolve only to 127.0.0.0/8 or ::1."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise BenchError(f"--host {host}: cannot resolve: {e}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if not addr.is_loopback:
            raise BenchError(
                f"--host {host}: resolves to {addr}, not loopback; the bench only talks to "
                "127.0.0.0/8 or ::1"
            )


def parse_cpus(text: str) -> set[int]:
    """``"1"``, ``"0,2"``, ``"2-5"`` -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise BenchError(f"bad CPU list {text!r}") from None
        cpus.update(range(a, b + 1))
    if not cpus:
        raise BenchError(f"bad CPU list {text!r}")
    return cpus


def now_ns() -> int:
    return time.perf_counter_ns()


def trio_deadline(ns: int) -> float:
    """The trio clock's reading at perf_counter_ns ``ns``."""
    return trio.current_time() + (ns - time.perf_counter_ns()) / NS


# ------------------------------------------------------------- connections


def _acquire(lock: trio.StrictFIFOLock) -> bool:
    try:
        lock.acquire_nowait()
        return True
    except trio.WouldBlock:
        return False


class TcpConn:
    """A TCP connection: 4-byte length + MessagePack map per frame."""

    kind = "tcp"

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(MAX_FRAME)
        self._lock = trio.StrictFIFOLock()

    @classmethod
    async def open(cls, host: str, port: int) -> TcpConn:
        try:
            return cls(await trio.open_tcp_stream(host, port))
        except OSError as e:
            raise BenchError(f"cannot connect to {host}:{port}: {e}") from None

    @staticmethod
    def encode(frames: Sequence[dict[str, Any]]) -> bytes:
        parts = []
        for f in frames:
            p = pack(f)
            parts.append(frame_prefix(p))
            parts.append(p)
        return b"".join(parts)

    async def send_frames(self, frames: Sequence[dict[str, Any]]) -> None:
        """Send ``frames`` with one write (safe to call from several tasks)."""
        data = self.encode(frames)
        if not _acquire(self._lock):
            await self._lock.acquire()
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise Closed(None, str(e)) from None
        finally:
            self._lock.release()

    async def receive(self) -> list[dict[str, Any]]:
        """Every frame that has arrived (at least one); raises Closed at EOF."""
        decoder = self.decoder
        while True:
            frames: list[dict[str, Any]] = []
            while True:
                f = decoder.next_frame()
                if f is NEED_DATA:
                    break
                frames.append(f)
            if frames:
                return frames
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise Closed(None, str(e)) from None
            if not data:
                raise Closed(None, "EOF")
            decoder.receive_data(data)

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            await self.stream.aclose()


class WsConn:
    """A WebSocket connection (trio-websocket): binary MessagePack or JSON text.

    trio-websocket runs a background reader task per connection in the
    ``nursery`` given to :meth:`open` (owned by the worker, so connections
    can be opened and closed from any task).
    """

    def __init__(self, ws: Any, text: bool) -> None:
        self.ws = ws
        self.text = text
        self.kind = "ws-json" if text else "ws"

    @classmethod
    async def open(
        cls, host: str, port: int, path: str = "/ws", text: bool = False, *, nursery: trio.Nursery
    ) -> WsConn:
        import trio_websocket

        h = f"[{host}]" if ":" in host else host
        try:
            with trio.fail_after(10):
                ws = await trio_websocket.connect_websocket_url(
                    nursery,
                    f"ws://{h}:{port}{path}",
                    message_queue_size=64,
                    max_message_size=1 << 24,
                    receive_buffer_size=RECEIVE_BYTES,
                )
        except trio.TooSlowError:
            raise Closed(None, "WebSocket handshake timed out") from None
        except OSError as e:
            raise BenchError(f"cannot connect to {h}:{port}: {e}") from None
        except trio_websocket.HandshakeError as e:
            raise Closed(None, f"WebSocket handshake failed: {e!r}") from None
        return cls(ws, text)

    async def send_frames(self, frames: Sequence[dict[str, Any]]) -> None:
        """Binary: one message holding all maps back to back; text: one message per frame."""
        import trio_websocket

        try:
            if self.text:
                for f in frames:
                    await self.ws.send_message(encode_ws(f, text=True))
            elif len(frames) == 1:
                await self.ws.send_message(pack(frames[0]))
            else:
                await self.ws.send_message(b"".join([pack(f) for f in frames]))
        except trio_websocket.ConnectionClosed as e:
            raise _closed(e) from None

    async def receive(self) -> list[dict[str, Any]]:
        import trio_websocket

        try:
            msg = await self.ws.get_message()
        except trio_websocket.ConnectionClosed as e:
            raise _closed(e) from None
        if isinstance(msg, str):
            return [json.loads(msg)]
        return decode_ws(msg, max_frame_bytes=MAX_FRAME, max_message_bytes=1 << 26)

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            with contextlib.suppress(Exception):
                await self.ws.aclose()


def _closed(e: Any) -> Closed:
    """Closed from trio-websocket's ConnectionClosed (whose reason may be None)."""
    reason = e.reason
    return Closed(getattr(reason, "code", None), getattr(reason, "reason", None))


Conn = TcpConn | WsConn


def connector(transport: str, host: str, port: int, nursery: trio.Nursery) -> Callable[[], Any]:
    """An ``async () -> Conn`` for the transport (WebSocket tasks live in ``nursery``)."""
    if transport == "tcp":
        return lambda: TcpConn.open(host, port)
    if transport in ("ws", "ws-json"):
        return lambda: WsConn.open(host, port, "/ws", text=transport == "ws-json", nursery=nursery)
    raise BenchError(f"unknown transport {transport!r}")


async def request(conn: Conn, frame: dict[str, Any]) -> dict[str, Any]:
    """Send a frame with a ``rid`` and wait for its reply (other frames are dropped)."""
    await conn.send_frames([frame])
    rid = frame["rid"]
    while True:
        for f in await conn.receive():
            if f.get("rid") == rid and f.get("op") in ("ok", "error", "pong"):
                return f
            if f.get("op") == "kicked":
                raise Closed(None, f"kicked: {f.get('reason')}")


async def authenticate(conn: Conn, user: str, token: str | None) -> str:
    """Authenticate ``conn`` as ``user``; return the token that now works for it.

    Order: the cached token (``auth``), else ``register``, else (``conflict``:
    registered by an earlier run) ``login``. ``rate_limited`` is waited out.
    """
    rid = 0
    ops: list[tuple[str, dict[str, Any]]] = []
    if token:
        ops.append(("auth", {"token": token}))
    ops.append(("register", {"user": user, "password": PASSWORD}))
    ops.append(("login", {"user": user, "password": PASSWORD}))
    i = 0
    tries = 0
    while i < len(ops):
        op, fields = ops[i]
        rid += 1
        reply = await request(conn, {"op": op, "rid": rid, "device": DEVICE, **fields})
        if reply["op"] == "ok":
            return reply.get("token") or token or ""
        code = reply.get("code")
        if code == "rate_limited" and tries < 10:
            tries += 1
            await trio.sleep(float(reply.get("retry_after") or 0.5))
            continue
        if (op == "auth" and code == "unauthorized") or (op == "register" and code == "conflict"):
            i += 1
            continue
        raise BenchError(f"{user}: {op} failed: {code}: {reply.get('message')}")
    raise BenchError(f"{user}: cannot authenticate")


async def open_authed(
    connect: Callable[[], Any], user: str, token: str | None, limiter: trio.CapacityLimiter
) -> tuple[Conn, str]:
    """Connect and authenticate ``user`` (a few tries: auth may time out under load)."""
    last: Exception | None = None
    for attempt in range(5):
        if attempt:
            await trio.sleep(0.5 * attempt)
        async with limiter:
            conn = await connect()
            try:
                new_token = await authenticate(conn, user, token)
                return conn, new_token
            except Closed as e:
                last = e
                await conn.aclose()
            except BaseException:
                await conn.aclose()
                raise
    raise BenchError(f"{user}: cannot authenticate: {last}")


# ------------------------------------------------------------ statistics


def latency_summary(samples_ns: Iterable[int]) -> dict[str, Any]:
    """n, mean, p50, p90, p99, p99.9, max in milliseconds (nearest rank)."""
    s = sorted(samples_ns)
    n = len(s)
    if not n:
        return {
            "n": 0,
            "mean": None,
            "p50": None,
            "p90": None,
            "p99": None,
            "p99_9": None,
            "max": None,
        }

    def pct(p: float) -> float:
        return round(s[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))] / 1e6, 3)

    return {
        "n": n,
        "mean": round(sum(s) / n / 1e6, 3),
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "p99_9": pct(99.9),
        "max": round(s[-1] / 1e6, 3),
    }


def new_samples() -> array.array[int]:
    return array.array("q")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _task_waits(pid: int | str) -> dict[str, int]:
    """Run-queue wait (ns) of every thread of ``pid``, from ``/proc/<pid>/task/*/schedstat``."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                out[tid] = int(f.read().split()[1])
    return out


def runqueue_wait_s(pid: int | str = "self") -> float:
    """Seconds the threads of process ``pid`` spent runnable but waiting for a CPU.

    From ``/proc/<pid>/task/*/schedstat`` (second field, ns). High values mean
    other processes competed for the CPUs it may use: the figures are then not
    representative of the code under test. (Threads that exit take their
    share with them; the load generator's worker is single-threaded while
    measuring.)
    """
    return sum(_task_waits(pid).values()) / NS


class TreeSample:
    """CPU and run-queue wait of a process and its descendants at one moment.

    Kept per process (CPU) and per thread (wait), so that a difference of two
    samples only compares what exists in both: a process or thread that ends
    in between drops out instead of making the sum go backwards, and one that
    starts in between counts from zero.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.cpu: dict[int, float] = {}
        self.wait: dict[tuple[int, str], int] = {}
        stats: dict[int, tuple[int, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read().decode(errors="replace")
                rest = raw[raw.rfind(")") + 2 :].split()
                # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15
                # (process totals: all threads, live and exited).
                stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _CLK_TCK)
            except (OSError, ValueError, IndexError):
                continue
        if root not in stats:
            return
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        todo = [root]
        while todo:
            pid = todo.pop()
            self.cpu[pid] = stats[pid][1]
            for tid, ns in _task_waits(pid).items():
                self.wait[(pid, tid)] = ns
            todo.extend(children.get(pid, []))

    def since(self, before: TreeSample) -> tuple[float, float, float]:
        """(root CPU s, descendants' CPU s, run-queue wait s) between ``before`` and this sample."""
        main = self.cpu.get(self.root, 0.0) - before.cpu.get(self.root, 0.0)
        kids = sum(v - before.cpu.get(pid, 0.0) for pid, v in self.cpu.items() if pid != self.root)
        wait = sum(v - before.wait.get(k, 0) for k, v in self.wait.items()) / NS
        return main, kids, wait


def cpu_times() -> dict[int, tuple[float, float]]:
    """Per CPU: (busy seconds, total seconds) since boot, from ``/proc/stat``.

    Busy counts user, nice, system, irq, softirq and steal (time the
    hypervisor gave to someone else is time our pinned processes could not
    have), i.e. everything but idle and iowait.
    """
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            v += [0] * (8 - len(v))
            user, nice, system, idle, iowait, irq, softirq, steal = v
            busy = user + nice + system + irq + softirq + steal
            out[int(name[3:])] = (busy / _CLK_TCK, (busy + idle + iowait) / _CLK_TCK)
    return out


def cpu_busy_pct(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[int, float]:
    """Busy % of each CPU between two :func:`cpu_times` samples."""
    out: dict[int, float] = {}
    for cpu, (busy, total) in after.items():
        b0, t0 = before.get(cpu, (0.0, 0.0))
        if total > t0:
            out[cpu] = round((busy - b0) / (total - t0) * 100, 1)
    return out


# ----------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Facts that make a result comparable: machine, Python, commit, date, command."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = None
    dirty = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
        if commit:
            dirty = bool(
                subprocess.run(
                    ["git", "status", "--porcelain", "--untracked-files=no"],
                    cwd=REPO_ROOT,
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
            )
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_1m_before": round(os.getloadavg()[0], 2),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# ------------------------------------------------------------- the server


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _set_pdeathsig() -> None:  # runs in the child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    raise_nofile()  # the server may hold as many connections as the hard limit allows


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return int(soft)


def rss_kib(pid: int) -> int | None:
    """VmRSS of process ``pid`` (that process only, not its children), KiB."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


class SpawnedServer:
    """The server as a subprocess: ``taskset -c CPUS python -m imserver.cli --config CFG serve``.

    Run from the repo root (``server.data_dir`` in bench.toml is relative to
    it). Its stderr goes to ``bench/data/server.log``. ``IMSERVER_*``
    variables are removed from its environment so that only the config file
    counts. If the bench dies, the kernel sends the server SIGTERM
    (PR_SET_PDEATHSIG), and the server stops its PostgreSQL.
    """

    def __init__(self, config: Path, cpus: str | None, host: str = "127.0.0.1") -> None:
        self.config = config
        self.cpus = cpus
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.stop_s: float | None = None
        self._log_start = 0
        cfg = tomllib.loads(config.read_text())
        self.tcp_port = int(cfg.get("tcp", {}).get("port", 7700))
        self.ws_port = int(cfg.get("websocket", {}).get("port", 7701))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 90.0) -> None:
        for port in (self.tcp_port, self.ws_port):
            if _port_open(self.host, port):
                raise BenchError(
                    f"something already listens on {self.host}:{port}; stop it, or run "
                    "without --spawn-server to bench that server"
                )
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "imserver.cli", "--config", str(self.config), "serve"]
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
        env["PYTHONUNBUFFERED"] = "1"
        log = open(SERVER_LOG, "ab")  # noqa: SIM115 - handed to the child
        self._log_start = log.seek(0, os.SEEK_END)
        stamp = datetime.datetime.now(datetime.UTC).isoformat()
        log.write(f"=== bench: {' '.join(cmd)} at {stamp}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_set_pdeathsig,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise BenchError(
                    f"server exited with {self.proc.returncode} while starting:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.tcp_port) and _port_open(self.host, self.ws_port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(
                    f"server did not listen within {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM, wait (graceful shutdown flushes and stops PostgreSQL), else SIGKILL.

        ``stop_s`` is how long the graceful shutdown took (it grows with the
        connections open: each is kicked with ``shutdown``).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            t = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"bench: server did not stop within {timeout:.0f} s; killing it",
                    file=sys.stderr,
                )
                self.proc.kill()
                self.proc.wait()
            self.stop_s = round(time.monotonic() - t, 2)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        try:
            with open(SERVER_LOG, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """Lines of this run's server log at WARNING or above (and tracebacks)."""
        out = []
        for line in self.log_text().splitlines():
            if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback|Error:", line):
                out.append(line)
        return out


def choose_cpus(
    cpu: str | None, server_cpu: str | None, spawn_server: bool
) -> tuple[str | None, str | None]:
    """The load generator's and the server's CPU lists (``--cpu``, ``--server-cpu``).

    With ``--spawn-server`` and no ``--cpu`` the generator takes CPU 1; on a
    one-CPU machine nothing is pinned.
    """
    gen_cpus = cpu
    if spawn_server and gen_cpus is None:
        gen_cpus = "1" if (os.cpu_count() or 1) > 1 else None
    server_cpus = server_cpu if (os.cpu_count() or 1) > 1 else None
    return gen_cpus, server_cpus


def foreign_cpu(
    busy: dict[int, float],
    gen_cpus: str | None,
    server_cpus: str | None,
    gen_own: float | None,
    server_own: float | None,
) -> tuple[float | None, float | None]:
    """What other processes used on the pinned CPUs (percent of a core): ``(gen, server)``.

    The busy time of the generator's (server's) CPUs minus our own processes'
    CPU there (``gen_own``, ``server_own``). ``None`` when that is not known:
    no busy figures, the CPUs not pinned, no own figure, or the two CPU sets
    overlapping.
    """
    foreign_gen = foreign_srv = None
    if gen_cpus is not None and busy and gen_own is not None:
        gen_set = parse_cpus(gen_cpus)
        if server_cpus is None or not gen_set & parse_cpus(server_cpus):
            foreign_gen = round(max(0.0, sum(busy.get(c, 0.0) for c in gen_set) - gen_own), 1)
    if server_cpus is not None and busy and server_own is not None:
        srv_set = parse_cpus(server_cpus)
        if gen_cpus is None or not srv_set & parse_cpus(gen_cpus):
            foreign_srv = round(max(0.0, sum(busy.get(c, 0.0) for c in srv_set) - server_own), 1)
    return foreign_gen, foreign_srv


def is_contended(foreign_gen: float | None, foreign_srv: float | None) -> bool:
    """Whether other processes used more than ``CONTENDED_PCT`` of a pinned CPU set."""
    return any(x is not None and x > CONTENDED_PCT for x in (foreign_gen, foreign_srv))


def contention_fields(
    busy: dict[int, float],
    foreign_gen: float | None,
    foreign_srv: float | None,
    contended: bool,
) -> dict[str, Any]:
    """The JSON fields on CPU contention, in their order, and the load average at the end.

    ``cpu_busy_pct``, ``foreign_cpu_pct_loadgen_cpus``,
    ``foreign_cpu_pct_server_cpus``, ``cpu_contended``, ``loadavg_1m_after``
    (read now).
    """
    return {
        "cpu_busy_pct": {str(k): v for k, v in sorted(busy.items())},
        "foreign_cpu_pct_loadgen_cpus": foreign_gen,
        "foreign_cpu_pct_server_cpus": foreign_srv,
        "cpu_contended": contended,
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def first_error_lines(first_error: dict[str, str]) -> list[str]:
    """Summary lines with the first error message of each kind, sorted by kind."""
    return [f"  first '{k}': {v}" for k, v in sorted(first_error.items())]


def require_spawn_host(host: str) -> None:
    """Refuse ``--spawn-server`` with a ``--host`` other than 127.0.0.1/localhost.

    The spawned server listens on 127.0.0.1 only.
    """
    if host not in ("127.0.0.1", "localhost"):
        raise BenchError("--spawn-server listens on 127.0.0.1; leave --host at its default")


def start_server(server: SpawnedServer, config: Path, server_cpus: str | None) -> None:
    """Start ``server``, printing the "starting" and "server up in" lines to stderr."""
    print(
        f"bench: starting server (taskset -c {server_cpus}) with {config.name} ...",
        file=sys.stderr,
    )
    t = time.monotonic()
    server.start()
    print(
        f"bench: server up in {time.monotonic() - t:.1f} s (pid {server.pid})",
        file=sys.stderr,
    )


def stop_server(server: SpawnedServer | None) -> tuple[int | None, list[str]]:
    """Stop a spawned server (if any): its exit code and its log's warning/error lines.

    ``(None, [])`` when no server was spawned.
    """
    if server is None:
        return None, []
    server_exit = server.stop()
    return server_exit, server.log_problems()


def server_warnings(problems: list[str], server_exit: int | None) -> list[str]:
    """Summary lines warning about the server log's problems and a non-zero exit code."""
    lines: list[str] = []
    if problems:
        lines.append(
            f"  WARNING: server log has {len(problems)} warning/error line(s) "
            f"({SERVER_LOG}), first:"
        )
        lines += ["    " + p[:300] for p in problems[:5]]
    if server_exit not in (None, 0):
        lines.append(f"  WARNING: server exited with code {server_exit}")
    return lines


def load_tokens() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(TOKEN_CACHE.read_text())
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    return {}


def save_tokens(tokens: dict[str, str]) -> None:
    with contextlib.suppress(OSError):
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        tmp = TOKEN_CACHE.with_suffix(".tmp")
        tmp.write_text(json.dumps(tokens, sort_keys=True))
        os.chmod(tmp, 0o600)
        tmp.replace(TOKEN_CACHE)


# ------------------------------------------------------- worker processes


class WorkerLink:
    """A worker's end of the pipe to the parent."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn

    def ready(self, info: dict[str, Any] | None = None) -> None:
        self.conn.send(("ready", info or {}))

    async def wait_start(self) -> int:
        """Block (in a thread) until the parent says go; returns t0 in perf_counter_ns."""
        msg = await trio.to_thread.run_sync(self.conn.recv, abandon_on_cancel=True)
        if msg[0] != "start":
            raise BenchError(f"worker: unexpected message {msg!r}")
        return int(msg[1])

    def tokens(self, tokens: dict[str, str]) -> None:
        self.conn.send(("tokens", dict(tokens)))

    def progress(self, counters: dict[str, Any]) -> None:
        self.conn.send(("progress", counters))

    def result(self, result: dict[str, Any]) -> None:
        self.conn.send(("result", result))

    def error(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("error", text))


def _worker_entry(
    module: str, fn: str, spec: dict[str, Any], conn: multiprocessing.connection.Connection
) -> None:
    import importlib

    link = WorkerLink(conn)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        getattr(importlib.import_module(module), fn)(spec, link)
    except (BenchError, Closed) as e:
        link.error(str(e))
    except BaseExceptionGroup as eg:
        leaves = []

        def walk(g: BaseException) -> None:
            if isinstance(g, BaseExceptionGroup):
                for x in g.exceptions:
                    walk(x)
            else:
                leaves.append(g)

        walk(eg)
        if all(isinstance(x, BenchError | Closed) for x in leaves):
            link.error("; ".join(sorted({str(x) for x in leaves}))[:2000])
        else:
            link.error(traceback.format_exc())
    except BaseException:  # noqa: BLE001 - the worker's boundary: report, the parent decides
        link.error(traceback.format_exc())
    finally:
        conn.close()


class Progress:
    """One status line on stderr, once a second: rewritten in place on a TTY, else a line each."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._width = 0

    def show(self, line: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, self._width - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
        self._width = 0


def run_workers(
    module: str,
    specs: list[dict[str, Any]],
    *,
    warmup: float,
    duration: float,
    setup_timeout: float,
    progress_line: Callable[[str, float, list[dict[str, Any]]], str],
    server: SpawnedServer | None = None,
    progress: Progress | None = None,
    tokens: dict[str, str] | None = None,
    on_tick: Callable[[str, list[dict[str, Any]]], None] | None = None,
    setup_line: Callable[[float, list[dict[str, Any]]], str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``module.worker(spec, link)`` in one process per spec; return their results.

    Phases: every worker sets up (connects, authenticates) and reports
    ready; the parent then sends one common ``t0`` (perf_counter_ns, a
    little in the future). Warmup is [t0, t0+warmup), measurement
    [t0+warmup, t0+warmup+duration), then at most MAX_DRAIN_S of drain;
    each worker stops by itself at the end of that. ``progress_line``
    renders the workers' latest counters once a second (``setup_line``, if
    given, during setup). ``on_tick(phase, latest)`` is called on every turn
    of the parent's loop (about 20 times a second; phase ``setup``,
    ``warmup``, ``measure`` or ``drain``), e.g. to sample the server's memory.

    Returns the workers' results and the parent's own observations (server
    CPU over the measurement window, timeline).
    """
    ctx = multiprocessing.get_context("spawn")
    progress = progress or Progress()
    links = []
    procs = []
    for spec in specs:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_worker_entry, args=(module, "worker", spec, child_end), daemon=True)
        p.start()
        child_end.close()
        links.append(parent_end)
        procs.append(p)
    latest: list[dict[str, Any]] = [{} for _ in specs]
    results: list[dict[str, Any] | None] = [None] * len(specs)
    observed: dict[str, Any] = {}

    def fail(msg: str) -> None:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise BenchError(msg)

    def poll(timeout: float) -> list[tuple[int, tuple[Any, ...]]]:
        out: list[tuple[int, tuple[Any, ...]]] = []
        open_links = [c for i, c in enumerate(links) if results[i] is None]
        for ready in multiprocessing.connection.wait(open_links, timeout=timeout):
            c = cast(multiprocessing.connection.Connection, ready)
            i = links.index(c)
            try:
                msg: tuple[Any, ...] = c.recv()
                if msg[0] == "tokens":
                    if tokens is not None:
                        tokens.update(msg[1])
                else:
                    out.append((i, msg))
            except EOFError:
                fail(f"load worker {i} died (exit code {procs[i].exitcode})")
        return out

    try:
        # -- setup: every worker connects and authenticates.
        ready = [False] * len(specs)
        t_setup = time.monotonic()
        next_show = t_setup + 1.0
        while not all(ready):
            if time.monotonic() - t_setup > setup_timeout:
                fail(f"setup took over {setup_timeout:.0f} s (connect + authenticate)")
            if server is not None and not server.alive():
                fail(f"the server exited during setup:\n{server.log_tail()}")
            for i, msg in poll(0.5):
                if msg[0] == "ready":
                    ready[i] = True
                elif msg[0] == "error":
                    fail(f"load worker {i} failed during setup: {msg[1]}")
                elif msg[0] == "progress":
                    latest[i] = msg[1]
            if on_tick is not None:
                on_tick("setup", latest)
            if time.monotonic() >= next_show:
                next_show += 1.0
                if setup_line is not None:
                    progress.show(setup_line(time.monotonic() - t_setup, latest))
                else:
                    progress.show(
                        f"bench setup   {time.monotonic() - t_setup:5.1f}s  "
                        f"{sum(ready)}/{len(specs)} workers connected and authenticated"
                    )
        observed["setup_s"] = round(time.monotonic() - t_setup, 2)

        # -- go.
        t0 = now_ns() + 300_000_000
        w0 = t0 + int(warmup * NS)
        w1 = w0 + int(duration * NS)
        hard_end = w1 + int((MAX_DRAIN_S + 15) * NS)
        for c in links:
            c.send(("start", t0))
        srv0 = srv1 = None
        machine0: tuple[int, dict[int, tuple[float, float]], float] | None = None
        machine1: tuple[int, dict[int, tuple[float, float]], float] | None = None
        next_tick = t0 + NS
        while any(r is None for r in results):
            now = now_ns()
            if now > hard_end:
                fail("workers did not finish in time")
            if machine0 is None and now >= w0:
                machine0 = (now, cpu_times(), cpu_seconds())
            if machine1 is None and now >= w1:
                machine1 = (now, cpu_times(), cpu_seconds())
            if server is not None and server.pid:
                if srv0 is None and now >= w0:
                    srv0 = (now, TreeSample(server.pid))
                if srv1 is None and now >= w1:
                    srv1 = (now, TreeSample(server.pid))
            for i, msg in poll(0.05):
                kind = msg[0]
                if kind == "progress":
                    latest[i] = msg[1]
                elif kind == "result":
                    results[i] = msg[1]
                elif kind == "error":
                    fail(f"load worker {i} failed: {msg[1]}")
            phase = "warmup" if now < w0 else "measure" if now < w1 else "drain"
            if on_tick is not None:
                on_tick(phase, latest)
            if now >= next_tick:
                next_tick += NS
                progress.show(progress_line(phase, (now - t0) / NS, latest))
        progress.done()
        if machine0 and machine1:
            wall = (machine1[0] - machine0[0]) / NS
            observed["cpu_busy_pct"] = cpu_busy_pct(machine0[1], machine1[1])
            observed["parent_cpu_pct"] = round((machine1[2] - machine0[2]) / wall * 100, 1)
        if srv0 and srv1:
            wall = (srv1[0] - srv0[0]) / NS
            main_s, kids_s, wait_s = srv1[1].since(srv0[1])
            observed["server_cpu_pct"] = round((main_s + kids_s) / wall * 100, 1)
            observed["server_python_cpu_pct"] = round(main_s / wall * 100, 1)
            observed["server_postgres_cpu_pct"] = round(kids_s / wall * 100, 1)
            observed["server_runqueue_wait_pct"] = round(wait_s / wall * 100, 1)
    finally:
        progress.done()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
    return [r for r in results if r is not None], observed


def set_affinity(cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, AttributeError) as e:
        raise BenchError(f"cannot pin the load generator to CPUs {sorted(cpus)}: {e}") from None


def emit(result: dict[str, Any], summary: str, json_path: str | None) -> None:
    """Print the human summary and the JSON line; append the JSON line to ``json_path``."""
    line = json.dumps(result, separators=(",", ":"), sort_keys=False)
    print(summary)
    print(line)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_lat(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "no samples"
    return (
        f"p50 {d['p50']:.2f}  p99 {d['p99']:.2f}  p99.9 {d['p99_9']:.2f}  "
        f"max {d['max']:.2f} ms  (n={d['n']:,})"
    )
