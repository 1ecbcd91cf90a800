"""``python -m bench idle``: C idle authenticated connections held with heartbeats.

Users ``idle0`` .. ``idle{C-1}``, one connection each (``--transport
tcp|ws|mixed``; mixed: even connections TCP, odd ones binary MessagePack over
WebSocket), authenticated with cached tokens (``auth``; a user without one is
registered once per data dir). Every authenticated connection sends
``{"op":"ping","rid":1}`` every ``--ping`` seconds (default 30, the protocol's
heartbeat), the pings spread evenly over the interval.

Phases: the server's RSS is read (``/proc/<pid>/status`` VmRSS of the server
process itself, not PostgreSQL) before anything connects; all C connect and
authenticate, at most ``--connect-concurrency`` at a time (connect rate,
connect+auth latency, failures by kind); after ``--settle`` seconds the RSS
is read again, so ``rss_per_conn_bytes`` = (settled - before) / authenticated
connections; then the connections are held for ``--duration`` seconds
(pong round trips, kicks, closes) and the RSS read once more.

Scale: the generator raises its open-file soft limit to the hard limit and
refuses to put more connections in one process than that allows (``--procs``
spreads them, dealt round-robin; default: as many processes as needed). Past
25,000 connections (or with ``--sources K``) connection i binds its source
address to 127.0.0.(2 + i mod K) first, so the ephemeral ports of one source
address (about 28,000 here) do not run out.

The receive side is one task per process: every socket sits in a private
``epoll`` served by one pump (as in ``fanout``); nothing but pongs should
arrive.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import heapq
import math
import os
import random
import select
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from . import common
from .common import NS, BenchError, Closed, now_ns, trio_deadline
from .fanout import Member, _split_maps, _ws_frame

USER_PREFIX = "idle"
SOURCES_FROM = 25_000  # connections beyond which source addresses are spread by default
PER_SOURCE = 20_000
FD_RESERVE = 64  # descriptors a worker keeps for itself (pipes, epoll, trio)
TICK_S = 0.1
DEFAULT_CONFIG = common.BENCH_DIR / "storm.toml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--conns", type=int, default=1000, help="idle connections to hold (default 1000)"
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ws", "mixed"),
        default="tcp",
        help="tcp, ws (binary MessagePack), mixed: even tcp, odd ws (default tcp)",
    )
    p.add_argument(
        "--ping",
        type=float,
        default=30.0,
        help="seconds between a connection's pings (default 30, the protocol heartbeat)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds after the last authentication before the RSS is read (default 5)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="connects + authentications in flight per generator process (default 64)",
    )
    p.add_argument(
        "--sources",
        type=int,
        default=None,
        help="spread source addresses over 127.0.0.2 .. 127.0.0.(K+1) "
        f"(default: 0 up to {SOURCES_FROM:,} connections, then one per {PER_SOURCE:,})",
    )
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="pid of a server you started yourself, for the RSS figures (--spawn-server knows it)",
    )
    p.add_argument("--ws-port", type=int, default=None, help="WebSocket port (default 7701)")


# ---------------------------------------------------------------- worker


class IdleConn(Member):
    __slots__ = ("ping_t",)

    def __init__(self, idx: int, ws: bool) -> None:
        super().__init__(idx, ws)
        self.user = f"{USER_PREFIX}{idx}"
        self.ping_t = 0

    def close_now(self) -> None:
        sock = self.sock
        self.closed = True
        self.sock = None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            trio.lowlevel.notify_closing(sock)
        if self.ws:
            with contextlib.suppress(OSError):
                sock.send(_ws_frame(0x8, (1000).to_bytes(2, "big")))
        with contextlib.suppress(OSError):
            sock.close()


def worker(spec: dict[str, Any], link: common.WorkerLink) -> None:
    link.result(trio.run(_run_idle, spec, link))


def _kind(e: BaseException) -> str:
    text = str(e)
    if "cannot connect" in text:
        return "connect: " + text.rsplit(": ", 1)[-1]
    if "cannot bind" in text:
        return "bind: " + text.rsplit(": ", 1)[-1]
    return text[:80]


async def _run_idle(spec: dict[str, Any], link: common.WorkerLink) -> dict[str, Any]:
    soft = common.raise_nofile()
    idxs: list[int] = spec["conns"]
    if len(idxs) + FD_RESERVE > soft:
        raise BenchError(
            f"{len(idxs)} connections in one process exceed its open-file limit ({soft}); "
            "use more --procs"
        )
    host = spec["host"]
    transport = spec["transport"]
    sources: int = spec["sources"]
    tokens: dict[str, str] = spec["tokens"]
    conns = [IdleConn(i, transport == "ws" or (transport == "mixed" and i % 2 == 1)) for i in idxs]
    failures: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    kicked: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    authed: list[IdleConn] = []
    connect_lat = array.array("q")
    pong_rtt = array.array("q")
    counters = {"pongs": 0, "pongs_win": 0, "pings": 0, "closed": 0, "ping_blocked": 0}
    win = {"w0": 1 << 62, "w1": 1 << 62}
    limiter = trio.CapacityLimiter(spec["connect_concurrency"])
    ep = select.epoll()
    by_fd: dict[int, IdleConn] = {}
    t_start = now_ns()
    t_last = t_start

    def fail(kind: str, detail: str) -> None:
        failures[kind] += 1
        first_error.setdefault(kind, detail[:300])

    def handle(c: IdleConn, raws: list[bytes], now: int) -> None:
        for raw in raws:
            try:
                f = msgpack.unpackb(raw)
            except Exception as e:  # noqa: BLE001 - any msgpack failure: the server's bug
                raise Closed(None, f"undecodable frame: {e}") from None
            op = f.get("op") if type(f) is dict else None
            if op == "pong":
                counters["pongs"] += 1
                if c.ping_t:
                    if win["w0"] <= now < win["w1"]:
                        pong_rtt.append(now - c.ping_t)
                        counters["pongs_win"] += 1
                    c.ping_t = 0
            elif op == "kicked":
                reason = str(f.get("reason"))
                kicked[reason] += 1
                c.kicked = c.kicked or reason
            elif op == "error":
                errors[str(f.get("code"))] += 1

    def lost(c: IdleConn) -> None:
        with contextlib.suppress(KeyError, OSError, ValueError):
            ep.unregister(c.fd)
        by_fd.pop(c.fd, None)
        if not c.closed:
            counters["closed"] += 1
            c.close_now()

    async def pump() -> None:
        epfd = ep.fileno()
        poll = ep.poll
        while True:
            await trio.lowlevel.wait_readable(epfd)
            while True:
                events = poll(0, 256)
                if not events:
                    break
                for fd, _ in events:
                    c = by_fd.get(fd)
                    if c is None or c.sock is None:
                        with contextlib.suppress(OSError, ValueError):
                            ep.unregister(fd)
                        continue
                    try:
                        data = c.sock.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        lost(c)
                        continue
                    now = now_ns()
                    try:
                        raws = c.split(data)
                        if c.ws:
                            raws = [x for p in raws for x in _split_maps(p)]
                        handle(c, raws, now)
                    except Closed:
                        lost(c)
                        continue
                    if c.ws_closed is not None:
                        lost(c)
                await trio.lowlevel.checkpoint()

    async def pinger() -> None:
        # Each connection pings every spec["ping"] seconds; its first ping
        # comes at a random point of the first interval after it
        # authenticated, so the pings of all connections are spread evenly.
        tcp_ping = common.TcpConn.encode([{"op": "ping", "rid": 1}])
        raw_ping = msgpack.packb({"op": "ping", "rid": 1})
        interval = int(spec["ping"] * NS)
        while True:
            await trio.sleep(TICK_S)
            now = now_ns()
            while due and due[0][0] <= now:
                _, j = heapq.heappop(due)
                c = conns[j]
                sock = c.sock
                if sock is None:
                    continue
                heapq.heappush(due, (now + interval, j))
                try:
                    sock.send(_ws_frame(0x2, raw_ping) if c.ws else tcp_ping)
                    counters["pings"] += 1
                    if not c.ping_t:
                        c.ping_t = now
                except BlockingIOError:
                    counters["ping_blocked"] += 1
                except OSError:
                    lost(c)

    due: list[tuple[int, int]] = []  # (next ping time, index in conns)
    rng = random.Random(os.getpid())

    async def open_one(j: int) -> None:
        nonlocal t_last
        c = conns[j]
        port = spec["ws_port"] if c.ws else spec["tcp_port"]
        source = f"127.0.0.{2 + c.idx % sources}" if sources else None
        async with limiter:
            t = now_ns()
            try:
                with trio.fail_after(spec["connect_timeout"]):
                    await c.connect(host, port, source)
            except trio.TooSlowError:
                c.close_now()
                fail("connect: timeout", f"{c.user}: no connection in {spec['connect_timeout']} s")
                return
            except BenchError as e:
                c.close_now()
                fail(_kind(e), str(e))
                return
            except Closed as e:
                c.close_now()
                fail("websocket handshake", str(e))
                return
            except OSError as e:
                c.close_now()
                fail(f"socket: {e.strerror or e}", str(e))
                return
            try:
                with trio.fail_after(spec["auth_timeout"]):
                    tok = await common.authenticate(c, c.user, tokens.get(c.user))
            except trio.TooSlowError:
                c.close_now()
                fail("auth: no reply in time", c.user)
                return
            except Closed as e:
                c.close_now()
                fail("auth: closed by server", f"{c.user}: {e}")
                return
            except BenchError as e:
                c.close_now()
                fail("auth: refused", str(e))
                return
            done = now_ns()
        connect_lat.append(done - t)
        t_last = max(t_last, done)
        if tok and tok != tokens.get(c.user):
            link.tokens({c.user: tok})
        c.authed = True
        authed.append(c)
        heapq.heappush(due, (done + int(rng.random() * spec["ping"] * NS), j))
        if c.sock is not None:
            by_fd[c.fd] = c
            ep.register(c.fd, select.EPOLLIN)
            if c.buf:
                with contextlib.suppress(Closed):
                    handle(c, c.split(b""), now_ns())

    def snapshot() -> dict[str, Any]:
        return {
            "authed": len(authed),
            "failed": sum(failures.values()),
            "pongs": counters["pongs"],
            "closed": counters["closed"],
            "kicked": sum(kicked.values()),
        }

    async def reporter() -> None:
        while True:
            await trio.sleep(0.5)
            link.progress(snapshot())

    cpu: dict[str, float] = {}
    try:
        async with trio.open_nursery() as background:
            background.start_soon(pump)
            background.start_soon(pinger)
            background.start_soon(reporter)
            async with trio.open_nursery() as n:
                for j in range(len(conns)):
                    n.start_soon(open_one, j)
            setup_end = now_ns()
            link.progress(snapshot())
            link.ready({"authed": len(authed)})
            t0 = await link.wait_start()
            w0 = t0 + int(spec["settle"] * NS)
            w1 = w0 + int(spec["duration"] * NS)
            win["w0"], win["w1"] = w0, w1
            await trio.sleep_until(trio_deadline(w0))
            cpu["c0"], cpu["t0"] = common.cpu_seconds(), now_ns()
            await trio.sleep_until(trio_deadline(w1))
            cpu["c1"], cpu["t1"] = common.cpu_seconds(), now_ns()
            still = sum(1 for c in authed if c.sock is not None)
            # Stay a moment past the window so the parent samples the server's
            # CPU and the machine at its end too.
            await trio.sleep(0.5)
            background.cancel_scope.cancel()
    finally:
        for c in conns:
            c.close_now()
        ep.close()
    cpu_pct = (cpu["c1"] - cpu["c0"]) / ((cpu["t1"] - cpu["t0"]) / NS) * 100 if cpu else None
    return {
        "pid": os.getpid(),
        "conns": len(conns),
        "authed": len(authed),
        "open_at_end": still,
        "tcp": sum(1 for c in conns if not c.ws),
        "ws": sum(1 for c in conns if c.ws),
        "failures": dict(failures),
        "first_error": first_error,
        "kicked": dict(kicked),
        "errors": dict(errors),
        "closed": counters["closed"],
        "pings": counters["pings"],
        "pongs": counters["pongs"],
        "pongs_win": counters["pongs_win"],
        "ping_blocked": counters["ping_blocked"],
        "t_start": t_start,
        "t_last": t_last,
        "setup_end": setup_end,
        "cpu_pct": cpu_pct,
        "connect_lat": connect_lat.tobytes(),
        "pong_rtt": pong_rtt.tobytes(),
    }


# ---------------------------------------------------------------- parent


def _samples(results: list[dict[str, Any]], key: str) -> array.array[int]:
    out = array.array("q")
    for r in results:
        out.frombytes(r[key])
    return out


def run(args: argparse.Namespace) -> int:
    C = args.conns
    if C < 1:
        raise BenchError("--conns must be at least 1")
    if args.ping <= 0 or args.settle < 0 or args.duration <= 0:
        raise BenchError("--ping and --duration must be > 0, --settle >= 0")
    if args.settle + args.duration > 300:
        raise BenchError("--settle + --duration is capped at 300 s")
    if args.connect_concurrency < 1:
        raise BenchError("--connect-concurrency must be at least 1")
    if args.plot:
        from . import plot

        plot.require()
    common.check_loopback(args.host)
    if args.host not in ("127.0.0.1", "localhost"):
        raise BenchError("idle connects to 127.0.0.1 (source addresses are spread over 127/8)")
    soft = common.raise_nofile()
    per_proc = max(1, soft - FD_RESERVE)
    procs = max(args.procs, math.ceil(C / per_proc))
    sources = args.sources
    if sources is None:
        sources = math.ceil(C / PER_SOURCE) if C > SOURCES_FROM else 0
    if not 0 <= sources <= 250:
        raise BenchError("--sources must be within 0..250")
    tcp_port = args.port or common.DEFAULT_PORTS["tcp"]
    ws_port = args.ws_port or common.DEFAULT_PORTS["ws"]

    env = common.environment()
    server = None
    gen_cpus, server_cpus = common.choose_cpus(args.cpu, args.server_cpu, args.spawn_server)
    server_pid = args.server_pid
    rss: dict[str, Any] = {"series": []}
    try:
        if args.spawn_server:
            cfg_path = args.server_config
            if cfg_path == str(common.DEFAULT_CONFIG):
                cfg_path = str(DEFAULT_CONFIG)  # cheap argon2 for thousands of users
            config = Path(cfg_path).resolve()
            server = common.SpawnedServer(config, server_cpus, host="127.0.0.1")
            tcp_port, ws_port = server.tcp_port, server.ws_port
            common.start_server(server, config, server_cpus)
            server_pid = server.pid
            time.sleep(1.0)
        if server_pid is None:
            print("bench: no --server-pid: no RSS figures", file=sys.stderr)
        else:
            rss["before"] = common.rss_kib(server_pid)
        if gen_cpus is not None:
            common.set_affinity(common.parse_cpus(gen_cpus))
        tokens = common.load_tokens()
        users = [f"{USER_PREFIX}{i}" for i in range(C)]
        new_users = sum(1 for u in users if u not in tokens)
        if new_users and not args.quiet:
            print(
                f"bench: {new_users:,} of {C:,} users have no cached token: registering them "
                "(one argon2 hash each; bench/storm.toml makes it cheap)",
                file=sys.stderr,
            )
        specs = []
        for w in range(procs):
            idx = list(range(w, C, procs))
            specs.append(
                {
                    "transport": args.transport,
                    "host": "127.0.0.1",
                    "tcp_port": tcp_port,
                    "ws_port": ws_port,
                    "conns": idx,
                    "sources": sources,
                    "ping": args.ping,
                    "settle": args.settle,
                    "duration": args.duration,
                    "connect_concurrency": args.connect_concurrency,
                    "connect_timeout": 30.0,
                    "auth_timeout": 60.0,
                    "tokens": {
                        f"{USER_PREFIX}{i}": tokens[f"{USER_PREFIX}{i}"]
                        for i in idx
                        if f"{USER_PREFIX}{i}" in tokens
                    },
                }
            )
        t_origin = time.monotonic()
        last_sample = [0.0]
        timeline: list[tuple[float, int, int]] = []

        def total(latest: list[dict[str, Any]], k: str) -> int:
            return sum(int(d.get(k, 0)) for d in latest)

        def on_tick(phase: str, latest: list[dict[str, Any]]) -> None:
            now = time.monotonic()
            first_measure = phase == "measure" and "settled" not in rss
            if now - last_sample[0] < 0.5 and not first_measure:
                return
            last_sample[0] = now
            authed_now = total(latest, "authed")
            timeline.append((now - t_origin, authed_now, total(latest, "failed")))
            if server_pid is None:
                return
            kib = common.rss_kib(server_pid)
            if kib is None:
                return
            rss["series"].append((now - t_origin, authed_now, kib))
            if phase == "measure" and "settled" not in rss:
                rss["settled"] = kib
                rss["settled_authed"] = authed_now
            if phase == "measure":
                rss["end"] = kib

        prev: dict[str, float] = {}

        def setup_line(t: float, latest: list[dict[str, Any]]) -> str:
            a = total(latest, "authed")
            rate = (a - prev.get("a", 0)) / max(1e-9, t - prev.get("t", 0.0))
            prev.update(a=a, t=t)
            rss_now = rss["series"][-1][2] if rss["series"] else 0
            return (
                f"bench setup  {t:6.1f}s  authenticated {a:7,d}/{C:,} ({rate:6,.0f}/s)  "
                f"failed {total(latest, 'failed'):,d}  server RSS {rss_now / 1024:7.1f} MiB"
            )

        def progress_line(phase: str, t: float, latest: list[dict[str, Any]]) -> str:
            rss_now = rss["series"][-1][2] if rss["series"] else 0
            ph = "settle" if phase == "warmup" else "hold" if phase == "measure" else phase
            return (
                f"bench {ph:6s} {t:6.1f}s  open {total(latest, 'authed'):7,d}  "
                f"pongs {total(latest, 'pongs'):8,d}  closed {total(latest, 'closed'):,d}  "
                f"kicked {total(latest, 'kicked'):,d}  server RSS {rss_now / 1024:7.1f} MiB"
            )

        try:
            results, observed = common.run_workers(
                "bench.idle",
                specs,
                warmup=args.settle,
                duration=args.duration,
                setup_timeout=max(common.SETUP_TIMEOUT_S, 60 + C * 0.02 + new_users * 0.05),
                progress_line=progress_line,
                server=server,
                progress=common.Progress(not args.quiet),
                tokens=tokens,
                on_tick=on_tick,
                setup_line=setup_line,
            )
        finally:
            common.save_tokens(tokens)
    finally:
        server_exit, problems = common.stop_server(server)

    def tot(k: str) -> int:
        return sum(int(r[k]) for r in results)

    failures: Counter[str] = Counter()
    kicked: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    for r in results:
        failures.update(r["failures"])
        kicked.update(r["kicked"])
        errors.update(r["errors"])
        for k, v in r["first_error"].items():
            first_error.setdefault(k, v)
    authed = tot("authed")
    span_s = (max(r["t_last"] for r in results) - min(r["t_start"] for r in results)) / NS
    connect_rate = authed / span_s if span_s > 0 else None
    conn_lat = common.latency_summary(_samples(results, "connect_lat"))
    rtt = common.latency_summary(_samples(results, "pong_rtt"))
    cpu_per_proc = [round(r["cpu_pct"], 1) for r in results if r["cpu_pct"] is not None]
    saturated = bool(cpu_per_proc) and max(cpu_per_proc) > common.SATURATED_PCT
    busy = observed.get("cpu_busy_pct") or {}
    foreign_gen, foreign_srv = common.foreign_cpu(
        busy,
        gen_cpus,
        server_cpus,
        sum(cpu_per_proc) + (observed.get("parent_cpu_pct") or 0.0) if cpu_per_proc else None,
        observed.get("server_cpu_pct") if args.spawn_server else None,
    )
    contended = common.is_contended(foreign_gen, foreign_srv)

    before, settled, end = rss.get("before"), rss.get("settled"), rss.get("end")
    per_conn = per_conn_end = None
    if before is not None and settled is not None and authed:
        per_conn = round((settled - before) * 1024 / authed)
    if before is not None and end is not None and authed:
        per_conn_end = round((end - before) * 1024 / authed)
    result: dict[str, Any] = {
        "bench": "idle",
        **env,
        "transport": args.transport,
        "conns": C,
        "conns_tcp": tot("tcp"),
        "conns_ws": tot("ws"),
        "ping_s": args.ping,
        "settle_s": args.settle,
        "duration_s": args.duration,
        "procs": procs,
        "sources": sources,
        "connect_concurrency": args.connect_concurrency,
        "loadgen_cpus": gen_cpus,
        "spawn_server": bool(args.spawn_server),
        "server_config": server.config.name if server is not None else None,
        "server_cpus": server_cpus if args.spawn_server else None,
        "authed": authed,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "first_error": first_error,
        "connect_rate_per_s": round(connect_rate, 1) if connect_rate else None,
        "connect_span_s": round(span_s, 2),
        "connect_auth_latency_ms": conn_lat,
        "open_at_end": tot("open_at_end"),
        "closed_by_server": tot("closed"),
        "kicked": dict(kicked),
        "errors": dict(errors),
        "pings": tot("pings"),
        "pongs": tot("pongs"),
        "ping_blocked": tot("ping_blocked"),
        "pong_rtt_ms": rtt,
        "server_pid": server_pid,
        "server_rss_before_kib": before,
        "server_rss_settled_kib": settled,
        "server_rss_end_kib": end,
        "rss_per_conn_bytes": per_conn,
        "rss_per_conn_bytes_end": per_conn_end,
        "setup_s": observed.get("setup_s"),
        "loadgen_cpu_pct": cpu_per_proc,
        "loadgen_saturated": saturated,
        "server_cpu_pct": observed.get("server_cpu_pct"),
        "server_python_cpu_pct": observed.get("server_python_cpu_pct"),
        "server_postgres_cpu_pct": observed.get("server_postgres_cpu_pct"),
        **common.contention_fields(busy, foreign_gen, foreign_srv, contended),
        "server_exit_code": server_exit,
        "server_stop_s": server.stop_s if server is not None else None,
        "server_log_problems": len(problems),
    }
    mix = f"{result['conns_tcp']:,} tcp + {result['conns_ws']:,} ws"
    lines = [
        f"bench idle: {C:,} connections ({mix}), ping every {args.ping:g} s, "
        f"{procs} generator proc(s), {sources or 'no'} spread source addresses",
        f"  authenticated {authed:,} of {C:,} in {span_s:.1f} s: "
        f"{(connect_rate or 0):,.0f} conn/s; connect+auth {common.fmt_lat(conn_lat)}",
        "  failures: "
        + (", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "none")
        + "; kicked: "
        + (", ".join(f"{k} {v}" for k, v in sorted(kicked.items())) or "none")
        + f"; closed by server {result['closed_by_server']}; open at the end "
        f"{result['open_at_end']:,}",
        f"  held {args.duration:g} s: {result['pongs']:,} pongs, round trip {common.fmt_lat(rtt)}",
    ]
    if per_conn is not None:
        lines.append(
            f"  server RSS {before / 1024:.1f} MiB before -> {settled / 1024:.1f} MiB settled "
            f"-> {end / 1024:.1f} MiB at the end: {per_conn:,} B per idle authenticated "
            f"connection ({(per_conn_end or 0):,} B at the end)"
        )
    gen = f"  load generator: {procs} proc(s)" + (f" on CPUs {gen_cpus}" if gen_cpus else "")
    gen += f", CPU while holding {'/'.join(f'{c:.0f}%' for c in cpu_per_proc)} of a core"
    if result["server_cpu_pct"] is not None:
        gen += f"; server while holding: {result['server_cpu_pct']:.1f}%"
    lines.append(gen)
    if contended:
        lines.append(
            "  WARNING: other processes competed for the pinned CPUs "
            f"(server CPUs {foreign_srv}%, generator CPUs {foreign_gen}%): rerun on a quiet machine"
        )
    if saturated:
        lines.append("  WARNING: load generator saturated; use --procs with more CPUs")
    lines += common.first_error_lines(first_error)
    lines += common.server_warnings(problems, server_exit)
    common.emit(result, "\n".join(lines), args.json)
    if args.plot:
        from . import plot

        series = rss["series"]
        plot.write_run(
            args.json,
            "idle",
            result,
            f"bench idle: {C:,} conns ({mix}); {per_conn or '?'} B RSS per connection\n",
            [
                (
                    "series",
                    "server RSS (MiB) against authenticated connections",
                    "MiB",
                    {"server RSS": ([s[1] for s in series], [s[2] / 1024 for s in series])},
                ),
                (
                    "series",
                    "authenticated connections over time",
                    "connections",
                    {"authenticated": ([s[0] for s in timeline], [s[1] for s in timeline])},
                ),
                (
                    "cdf",
                    "connect + authenticate latency; pong round trip while holding",
                    {
                        "connect+auth": [x / 1e6 for x in _samples(results, "connect_lat")],
                        "pong RTT": [x / 1e6 for x in _samples(results, "pong_rtt")],
                    },
                ),
            ],
            xlabels={0: "authenticated connections"},
        )
    bad = authed < C or result["closed_by_server"] or kicked
    return 1 if bad else 0
