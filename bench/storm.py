"""``python -m bench storm``: N offline users get M messages each, then all reconnect at once.

Users ``st0`` .. ``st{N-1}`` (recipients) and ``sts0`` .. ``sts{K-1}``
(senders; ``--senders`` K). Phases:

1. **Register** every user without a cached token (``register`` over TCP,
   then closed); with ``bench/storm.toml`` (cheap argon2: time cost 1, 64 KiB)
   10,000 registrations take seconds, not the ~50 min of default argon2.
2. **Seed** (in the parent process, not timed as catch-up): the recipients
   are offline; each sender ``sts{k}`` has one TCP connection and sends to the
   recipients ``i`` with ``i mod K == k``, round after round (message r of
   every recipient, then r+1), closed loop with ``--window`` sends in flight
   per sender. Every send goes through the server and is acknowledged after
   its durable commit, so every recipient's direct conversation
   ``d:sts{k}:st{i}`` holds M new messages with real seqs: ``base+1`` ..
   ``base+M`` (``base`` = the seq before the first one, from the acks).
   Bodies are ``<run>:<i>:<r>:`` padded to ``--body-bytes``.
3. **Storm** (the measurement): at one moment t0 all N recipients connect
   at once (no concurrency limit unless ``--connect-concurrency``),
   authenticate with their cached tokens, send ``sync``, check that their
   conversation's ``last_seq`` covers the new messages, and page
   ``history`` with ``after_seq`` (starting at the ``base`` a real client
   would have kept) and ``limit`` ``--page`` until they hold every message.
   A connection that fails is retried like a client would (after 0.5, 1,
   2 s; at most 4 tries) and each failure is counted by kind.

Verified per user: the seqs arrive as base+1, base+2, ... base+M, each
once, in ascending order, and every body names this run, this user, and a
distinct round r < M. ``time_to_all_s`` is t0 until the last user holds its
last message; ``catchup_msgs_per_s`` = N*M / that. Bounded: the storm
phase stops after ``--timeout`` seconds (default 120) whatever happened.
"""

from __future__ import annotations

import argparse
import array
import math
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from . import common
from .common import NS, BenchError, Closed, now_ns, trio_deadline
from .fanout import Member

RECIPIENT = "st"
SENDER = "sts"
DEFAULT_CONFIG = common.BENCH_DIR / "storm.toml"
BUCKET_S = 0.25


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=1000, help="offline users N (default 1000)")
    p.add_argument(
        "--messages", type=int, default=100, help="messages M per user while offline (default 100)"
    )
    p.add_argument(
        "--senders", type=int, default=4, help="sender users (connections) seeding (default 4)"
    )
    p.add_argument(
        "--window", type=int, default=256, help="seeding: sends in flight per sender (default 256)"
    )
    p.add_argument(
        "--page", type=int, default=200, help="history limit per request, 1..200 (default 200)"
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ws", "mixed"),
        default="tcp",
        help="for the reconnecting users: tcp, ws, mixed (even tcp, odd ws) (default tcp)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=0,
        help="reconnects in flight per process during the storm, 0 = all at once (default 0)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds the storm phase may take at most (default 120)",
    )
    p.add_argument(
        "--seed-timeout",
        type=float,
        default=900.0,
        help="seconds registration + seeding may take at most (default 900)",
    )
    p.add_argument("--body-bytes", type=int, default=32, help="message body size (default 32)")
    p.add_argument("--ws-port", type=int, default=None, help="WebSocket port (default 7701)")


# ------------------------------------------------------------ registration and seeding


async def _register(
    host: str,
    port: int,
    users: list[str],
    tokens: dict[str, str],
    progress: common.Progress,
    timeout: float,
) -> None:
    """Register (or log in) every user without a cached token; 16 at a time."""
    limiter = trio.CapacityLimiter(16)
    done = [0]
    t = time.monotonic()

    async def one(user: str) -> None:
        async with limiter:
            conn, tok = await common.open_authed(
                lambda: common.TcpConn.open(host, port), user, None, trio.CapacityLimiter(1)
            )
            await conn.aclose()
        tokens[user] = tok
        done[0] += 1

    async def show() -> None:
        while True:
            await trio.sleep(1)
            progress.show(
                f"bench register {time.monotonic() - t:6.1f}s  {done[0]:,}/{len(users):,} users"
            )

    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:
            n.start_soon(show)
            async with trio.open_nursery() as m:
                for u in users:
                    m.start_soon(one, u)
            n.cancel_scope.cancel()
    progress.done()


async def _seed(
    args: argparse.Namespace,
    port: int,
    tokens: dict[str, str],
    run_id: str,
    progress: common.Progress,
) -> dict[str, Any]:
    """Send M messages to every recipient; return per-recipient (base, final) and counts."""
    N, M, K = args.users, args.messages, args.senders
    pad = max(0, args.body_bytes)
    lo = [0] * N
    hi = [0] * N
    count = [0] * N
    errors: Counter[str] = Counter()
    st = {"acked": 0, "sent": 0, "ooo": 0}
    t_start = time.monotonic()

    async def sender(k: int) -> None:
        user = f"{SENDER}{k}"
        conn, tok = await common.open_authed(
            lambda: common.TcpConn.open(args.host, port),
            user,
            tokens.get(user),
            trio.CapacityLimiter(1),
        )
        tokens[user] = tok
        recips = list(range(k, N, K))
        todo = [(r, i) for r in range(M) for i in recips]
        todo.reverse()  # pop() from the end: round 0 first
        inflight: dict[int, tuple[int, int]] = {}
        last_seq: dict[int, int] = {}
        rid = 0
        try:
            while todo or inflight:
                batch = []
                while todo and len(inflight) < args.window:
                    r, i = todo.pop()
                    rid += 1
                    inflight[rid] = (r, i)
                    head = f"{run_id}:{i}:{r}:"
                    batch.append(
                        {
                            "op": "send",
                            "rid": rid,
                            "to": f"{RECIPIENT}{i}",
                            "cid": f"{run_id}.{i}.{r}",
                            "body": head + "x" * (pad - len(head)),
                        }
                    )
                if batch:
                    st["sent"] += len(batch)
                    await conn.send_frames(batch)
                for f in await conn.receive():
                    op = f.get("op")
                    if op == "ok" and f.get("rid") in inflight:
                        r, i = inflight.pop(f["rid"])
                        seq = int(f["seq"])
                        if seq <= last_seq.get(i, 0):
                            st["ooo"] += 1
                        last_seq[i] = seq
                        lo[i] = seq if not lo[i] else min(lo[i], seq)
                        hi[i] = max(hi[i], seq)
                        count[i] += 1
                        st["acked"] += 1
                    elif op == "error" and f.get("rid") in inflight:
                        code = str(f.get("code"))
                        errors[code] += 1
                        item = inflight.pop(f["rid"])
                        if code in ("rate_limited", "unavailable") and errors[code] < 100_000:
                            todo.append(item)  # the same cid: idempotent
                            await trio.sleep(float(f.get("retry_after") or 0.2))
                        else:
                            raise BenchError(f"{user}: send failed: {code}: {f.get('message')}")
                    elif op == "kicked":
                        raise BenchError(f"{user} kicked while seeding: {f.get('reason')}")
        finally:
            await conn.aclose()

    async def show() -> None:
        prev = (time.monotonic(), 0)
        while True:
            await trio.sleep(1)
            now = time.monotonic()
            rate = (st["acked"] - prev[1]) / (now - prev[0])
            prev = (now, st["acked"])
            left = (N * M - st["acked"]) / rate if rate > 0 else float("inf")
            progress.show(
                f"bench seed {now - t_start:6.1f}s  acked {st['acked']:9,d}/{N * M:,} "
                f"({rate:6,.0f}/s, ~{min(left, 99999):,.0f} s left)  errors {sum(errors.values())}"
            )

    with trio.fail_after(args.seed_timeout):
        async with trio.open_nursery() as n:
            n.start_soon(show)
            async with trio.open_nursery() as m:
                for k in range(K):
                    m.start_soon(sender, k)
            n.cancel_scope.cancel()
    progress.done()
    seconds = time.monotonic() - t_start
    bad = [i for i in range(N) if count[i] != M or hi[i] - lo[i] + 1 != M]
    if bad:
        i = bad[0]
        raise BenchError(
            f"seeding: {len(bad)} users did not get {M} contiguous seqs (e.g. {RECIPIENT}{i}: "
            f"{count[i]} acks, seqs {lo[i]}..{hi[i]}); is something else writing to them?"
        )
    return {
        "base": [x - 1 for x in lo],
        "seed_s": round(seconds, 1),
        "seed_msgs_per_s": round(N * M / seconds, 1),
        "seed_errors": dict(errors),
        "seed_acks_out_of_order": st["ooo"],
    }


# ---------------------------------------------------------------- worker


async def _request(conn: Member, frame: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """:func:`common.request` that keeps the codes of frames without our rid.

    A server that closes a connection says why first (``auth_timeout``
    error, ``kicked``); those codes go to ``notes`` so the failure is counted
    by its cause, not as a bare EOF.
    """
    await conn.send_frames([frame])
    rid = frame["rid"]
    while True:
        for f in await conn.receive():
            if f.get("rid") == rid and f.get("op") in ("ok", "error", "pong"):
                return f
            if f.get("op") == "error":
                notes.append(str(f.get("code")))
            elif f.get("op") == "kicked":
                notes.append(f"kicked {f.get('reason')}")


async def _authenticate(conn: Member, user: str, token: str, notes: list[str]) -> None:
    reply = await _request(
        conn, {"op": "auth", "rid": 1, "token": token, "device": common.DEVICE}, notes
    )
    if reply.get("op") != "ok":
        raise BenchError(f"{user}: auth refused: {reply.get('code')}: {reply.get('message')}")


def worker(spec: dict[str, Any], link: common.WorkerLink) -> None:
    link.result(trio.run(_run_storm, spec, link))


async def _run_storm(spec: dict[str, Any], link: common.WorkerLink) -> dict[str, Any]:
    common.raise_nofile()
    idxs: list[int] = spec["users"]
    bases: list[int] = spec["bases"]
    M = spec["messages"]
    page = spec["page"]
    run_id = spec["run_id"]
    transport = spec["transport"]
    tokens: dict[str, str] = spec["tokens"]
    limiter = trio.CapacityLimiter(spec["connect_concurrency"] or 1_000_000)
    failures: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    check = {"gaps": 0, "dups": 0, "bad_body": 0, "sync_stale": 0, "missing_conv": 0}
    done_ns = array.array("q")
    st = {"msgs": 0, "done": 0, "requests": 0, "failed_users": 0}
    buckets: Counter[int] = Counter()
    t0_box = [0]

    def fail(kind: str, detail: str) -> None:
        failures[kind] += 1
        first_error.setdefault(kind, detail[:300])

    async def catch_up(j: int) -> None:
        i = idxs[j]
        user = f"{RECIPIENT}{i}"
        sender = f"{SENDER}{i % spec['senders']}"
        a, b = sorted((sender, user))
        conv = f"d:{a}:{b}"
        base = bases[j]
        final = base + M
        have = base  # the highest seq held, as a client keeps it
        seen = bytearray(M)
        prefix = f"{run_id}:{i}:"
        ws = transport == "ws" or (transport == "mixed" and i % 2 == 1)
        port = spec["ws_port"] if ws else spec["tcp_port"]
        rid = 1
        for attempt in range(4):
            if attempt:
                await trio.sleep((0.5, 1.0, 2.0)[attempt - 1])
            c = Member(i, ws)
            notes: list[str] = []
            stage = "connect"
            try:
                async with limiter:
                    with trio.fail_after(30):
                        await c.connect(spec["host"], port)
                stage = "auth"
                with trio.fail_after(60):
                    await _authenticate(c, user, tokens[user], notes)
                    stage = "sync"
                    rid += 1
                    st["requests"] += 1
                    reply = await _request(c, {"op": "sync", "rid": rid}, notes)
                if reply.get("op") != "ok":
                    fail(f"sync: {reply.get('code')}", f"{user}: {reply.get('message')}")
                    continue
                last = None
                for cv in reply.get("convs", []):
                    if cv.get("conv") == conv:
                        last = int(cv.get("last_seq") or 0)
                if last is None:
                    check["missing_conv"] += 1
                    first_error.setdefault("missing_conv", f"{user}: {conv} not in sync")
                    last = final
                elif last < final:
                    check["sync_stale"] += 1
                while have < final:
                    rid += 1
                    st["requests"] += 1
                    stage = "history"
                    with trio.fail_after(60):
                        reply = await _request(
                            c,
                            {
                                "op": "history",
                                "rid": rid,
                                "conv": conv,
                                "after_seq": have,
                                "limit": page,
                            },
                            notes,
                        )
                    if reply.get("op") != "ok":
                        code = reply.get("code")
                        fail(f"history: {code}", f"{user}: {reply.get('message')}")
                        if code in ("rate_limited", "unavailable"):
                            await trio.sleep(float(reply.get("retry_after") or 0.5))
                            continue
                        raise Closed(None, f"history refused: {code}")
                    msgs = reply.get("msgs") or []
                    now = now_ns()
                    n = 0
                    for m in msgs:
                        seq = int(m.get("seq") or 0)
                        if seq <= have:
                            check["dups"] += 1
                            continue
                        if seq > have + 1:
                            check["gaps"] += seq - have - 1
                        have = seq
                        if seq > final:
                            continue
                        body = str(m.get("body") or "")
                        ok = body.startswith(prefix)
                        if ok:
                            try:
                                r = int(body[len(prefix) :].split(":", 1)[0])
                                ok = 0 <= r < M and not seen[r]
                                if ok:
                                    seen[r] = 1
                            except ValueError:
                                ok = False
                        if not ok:
                            check["bad_body"] += 1
                        n += 1
                    st["msgs"] += n
                    buckets[int((now - t0_box[0]) / NS / BUCKET_S)] += n
                    if not msgs and have < final:
                        check["gaps"] += final - have
                        first_error.setdefault("short_history", f"{user}: history ended at {have}")
                        have = final
                    if not reply.get("more") and have < final:
                        continue  # ask again from where we are: more may have been committed
                done_ns.append(now_ns() - t0_box[0])
                st["done"] += 1
                return
            except trio.TooSlowError:
                fail(f"{stage}: timeout (30 s connect / 60 s request)", user)
            except Closed as e:
                why = notes[-1] if notes else "EOF"
                fail(f"{stage}: closed by server ({why})", f"{user}: {e}")
            except BenchError as e:
                text = str(e)
                kind = "connect" if "cannot connect" in text else "auth"
                fail(kind, text)
            except OSError as e:
                fail(f"socket: {e.strerror or e}", str(e))
            finally:
                c.closed = True
                sock, c.sock = c.sock, None
                if sock is not None:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
        st["failed_users"] += 1

    async def reporter() -> None:
        while True:
            await trio.sleep(0.5)
            link.progress(
                {
                    "msgs": st["msgs"],
                    "done": st["done"],
                    "failed_users": st["failed_users"],
                    "failures": sum(failures.values()),
                }
            )

    cpu: dict[str, float] = {}
    link.ready({"users": len(idxs)})
    t0 = await link.wait_start()
    t0_box[0] = t0
    end = t0 + int(spec["timeout"] * NS)
    timed_out = False
    with trio.move_on_at(trio_deadline(end)) as scope:
        async with trio.open_nursery() as bg:
            bg.start_soon(reporter)
            await trio.sleep_until(trio_deadline(t0))
            cpu["c0"], cpu["t0"] = common.cpu_seconds(), now_ns()
            async with trio.open_nursery() as n:
                for j in range(len(idxs)):
                    n.start_soon(catch_up, j)
            cpu["c1"], cpu["t1"] = common.cpu_seconds(), now_ns()
            bg.cancel_scope.cancel()
    if scope.cancelled_caught:
        timed_out = True
        cpu["c1"], cpu["t1"] = common.cpu_seconds(), now_ns()
    cpu_pct = (cpu["c1"] - cpu["c0"]) / max(1e-9, (cpu["t1"] - cpu["t0"]) / NS) * 100
    return {
        "users": len(idxs),
        "done": st["done"],
        "failed_users": st["failed_users"],
        "msgs": st["msgs"],
        "requests": st["requests"],
        "failures": dict(failures),
        "first_error": first_error,
        **check,
        "timed_out": timed_out,
        "cpu_pct": cpu_pct,
        "done_ns": done_ns.tobytes(),
        "buckets": dict(buckets),
    }


# ---------------------------------------------------------------- parent


def run(args: argparse.Namespace) -> int:
    N, M = args.users, args.messages
    if N < 1 or M < 1:
        raise BenchError("--users and --messages must be at least 1")
    if not 1 <= args.senders <= N:
        raise BenchError("--senders must be within 1..--users")
    if not 1 <= args.page <= 200:
        raise BenchError("--page must be within 1..200 (the protocol's history limit)")
    if args.window < 1 or args.timeout <= 0 or args.seed_timeout <= 0:
        raise BenchError("--window, --timeout and --seed-timeout must be positive")
    if args.timeout > 600:
        raise BenchError("--timeout is capped at 600 s")
    if not 0 <= args.body_bytes <= 16384:
        raise BenchError("--body-bytes must be within 0..16384")
    if args.plot:
        from . import plot

        plot.require()
    common.check_loopback(args.host)
    soft = common.raise_nofile()
    procs = max(args.procs, math.ceil(N / max(1, soft - 256)))
    tcp_port = args.port or common.DEFAULT_PORTS["tcp"]
    ws_port = args.ws_port or common.DEFAULT_PORTS["ws"]
    progress = common.Progress(not args.quiet)

    env = common.environment()
    server = None
    gen_cpus, server_cpus = common.choose_cpus(args.cpu, args.server_cpu, args.spawn_server)
    srv: dict[str, Any] = {}
    timeline: list[tuple[float, int, int]] = []
    try:
        if args.spawn_server:
            cfg_path = args.server_config
            if cfg_path == str(common.DEFAULT_CONFIG):
                cfg_path = str(DEFAULT_CONFIG)  # cheap argon2 for thousands of users
            config = Path(cfg_path).resolve()
            server = common.SpawnedServer(config, server_cpus, host="127.0.0.1")
            common.require_spawn_host(args.host)
            tcp_port, ws_port = server.tcp_port, server.ws_port
            common.start_server(server, config, server_cpus)
        if gen_cpus is not None:
            common.set_affinity(common.parse_cpus(gen_cpus))
        tokens = common.load_tokens()
        users = [f"{RECIPIENT}{i}" for i in range(N)] + [
            f"{SENDER}{k}" for k in range(args.senders)
        ]
        missing = [u for u in users if u not in tokens]
        run_id = f"{int(time.time()):x}{secrets.token_hex(2)}"
        try:
            t = time.monotonic()
            if missing:
                print(
                    f"bench: registering {len(missing):,} users (cheap argon2 with storm.toml)",
                    file=sys.stderr,
                )
                trio.run(
                    _register, args.host, tcp_port, missing, tokens, progress, args.seed_timeout
                )
            register_s = time.monotonic() - t
            print(
                f"bench: seeding {N:,} x {M:,} = {N * M:,} messages from {args.senders} senders "
                f"(window {args.window}) ...",
                file=sys.stderr,
            )
            seed = trio.run(_seed, args, tcp_port, tokens, run_id, progress)
        except trio.TooSlowError:
            raise BenchError(
                f"registration + seeding took over --seed-timeout {args.seed_timeout:g} s"
            ) from None
        finally:
            common.save_tokens(tokens)
        print(
            f"bench: seeded in {seed['seed_s']:.0f} s ({seed['seed_msgs_per_s']:,.0f} msg/s); "
            f"now all {N:,} users reconnect at once",
            file=sys.stderr,
        )
        specs = []
        for w in range(procs):
            idx = list(range(w, N, procs))
            specs.append(
                {
                    "transport": args.transport,
                    "host": args.host,
                    "tcp_port": tcp_port,
                    "ws_port": ws_port,
                    "users": idx,
                    "bases": [seed["base"][i] for i in idx],
                    "messages": M,
                    "senders": args.senders,
                    "page": args.page,
                    "run_id": run_id,
                    "timeout": args.timeout,
                    "connect_concurrency": args.connect_concurrency,
                    "tokens": {f"{RECIPIENT}{i}": tokens[f"{RECIPIENT}{i}"] for i in idx},
                }
            )
        t_go = [0.0]
        last = [0.0]

        def on_tick(phase: str, latest: list[dict[str, Any]]) -> None:
            if phase == "setup" or server is None or server.pid is None:
                return
            now = time.monotonic()
            if not t_go[0]:
                t_go[0] = now
                srv["first"] = (now_ns(), common.TreeSample(server.pid))
                srv["before"] = common.cpu_times()
                srv["parent0"] = common.cpu_seconds()
            if now - last[0] >= 0.5:
                last[0] = now
                srv["last"] = (now_ns(), common.TreeSample(server.pid))
                srv["after"] = common.cpu_times()
                srv["parent1"] = common.cpu_seconds()
                timeline.append(
                    (
                        now - t_go[0],
                        sum(int(d.get("msgs", 0)) for d in latest),
                        sum(int(d.get("done", 0)) for d in latest),
                    )
                )

        prev: dict[str, float] = {}

        def progress_line(phase: str, t: float, latest: list[dict[str, Any]]) -> str:
            msgs = sum(int(d.get("msgs", 0)) for d in latest)
            done = sum(int(d.get("done", 0)) for d in latest)
            rate = (msgs - prev.get("m", 0)) / max(1e-9, t - prev.get("t", 0.0))
            prev.update(m=msgs, t=t)
            return (
                f"bench storm {t:6.1f}s  users done {done:7,d}/{N:,}  messages "
                f"{msgs:10,d}/{N * M:,} ({rate:8,.0f}/s)  failures "
                f"{sum(int(d.get('failures', 0)) for d in latest):,d}"
            )

        results, _ = common.run_workers(
            "bench.storm",
            specs,
            warmup=0.0,
            duration=args.timeout,
            setup_timeout=common.SETUP_TIMEOUT_S,
            progress_line=progress_line,
            server=server,
            progress=progress,
            tokens=None,
            on_tick=on_tick,
        )
    finally:
        server_exit, problems = common.stop_server(server)

    def tot(k: str) -> int:
        return sum(int(r[k]) for r in results)

    failures: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    buckets: Counter[int] = Counter()
    done_ns = array.array("q")
    for r in results:
        failures.update(r["failures"])
        buckets.update({int(k): v for k, v in r["buckets"].items()})
        done_ns.frombytes(r["done_ns"])
        for k, v in r["first_error"].items():
            first_error.setdefault(k, v)
    done = tot("done")
    msgs = tot("msgs")
    all_done = done == N
    t_all = max(done_ns) / NS if all_done and done_ns else None
    completion = common.latency_summary(done_ns)
    cpu_per_proc = [round(r["cpu_pct"], 1) for r in results]
    saturated = bool(cpu_per_proc) and max(cpu_per_proc) > common.SATURATED_PCT
    srv_cpu = srv_py = srv_pg = None
    foreign_srv = foreign_gen = None
    busy: dict[int, float] = {}
    if "first" in srv and "last" in srv:
        wall = (srv["last"][0] - srv["first"][0]) / NS
        if wall > 0:
            main_s, kids_s, _ = srv["last"][1].since(srv["first"][1])
            srv_cpu = round((main_s + kids_s) / wall * 100, 1)
            srv_py = round(main_s / wall * 100, 1)
            srv_pg = round(kids_s / wall * 100, 1)
            busy = common.cpu_busy_pct(srv["before"], srv["after"])
            if server_cpus is not None:
                srv_set = common.parse_cpus(server_cpus)
                foreign_srv = round(max(0.0, sum(busy.get(c, 0.0) for c in srv_set) - srv_cpu), 1)
            if gen_cpus is not None:
                gen_set = common.parse_cpus(gen_cpus)
                if server_cpus is None or not gen_set & common.parse_cpus(server_cpus):
                    parent = (srv["parent1"] - srv["parent0"]) / wall * 100
                    own = sum(cpu_per_proc) + parent
                    foreign_gen = round(max(0.0, sum(busy.get(c, 0.0) for c in gen_set) - own), 1)
    contended = common.is_contended(foreign_gen, foreign_srv)
    bad_counts = {k: tot(k) for k in ("gaps", "dups", "bad_body", "sync_stale", "missing_conv")}
    result: dict[str, Any] = {
        "bench": "storm",
        **env,
        "transport": args.transport,
        "users": N,
        "messages_per_user": M,
        "senders": args.senders,
        "page": args.page,
        "procs": procs,
        "loadgen_cpus": gen_cpus,
        "spawn_server": bool(args.spawn_server),
        "server_config": server.config.name if server is not None else None,
        "server_cpus": server_cpus if args.spawn_server else None,
        "argon2": "cheap (storm.toml: time cost 1, 64 KiB)"
        if server is not None and server.config.name == "storm.toml"
        else None,
        "fsync": True if args.spawn_server else None,
        "register_s": round(register_s, 1),
        "registered": len(missing),
        **seed,
        "users_done": done,
        "users_failed": tot("failed_users"),
        "all_done": all_done,
        "time_to_all_s": round(t_all, 3) if t_all is not None else None,
        "catchup_msgs": msgs,
        "catchup_msgs_per_s": round(msgs / t_all, 1) if t_all else None,
        "requests": tot("requests"),
        "user_completion_ms": completion,
        "failures": dict(failures),
        "first_error": first_error,
        **bad_counts,
        "timed_out": any(r["timed_out"] for r in results),
        "loadgen_cpu_pct": cpu_per_proc,
        "loadgen_saturated": saturated,
        "server_cpu_pct": srv_cpu,
        "server_python_cpu_pct": srv_py,
        "server_postgres_cpu_pct": srv_pg,
        **common.contention_fields(busy, foreign_gen, foreign_srv, contended),
        "server_exit_code": server_exit,
        "server_stop_s": server.stop_s if server is not None else None,
        "server_log_problems": len(problems),
    }
    del result["base"]
    lines = [
        f"bench storm: {N:,} users x {M:,} messages ({args.transport}), seeded by "
        f"{args.senders} senders in {seed['seed_s']:.0f} s ({seed['seed_msgs_per_s']:,.0f} msg/s)",
        f"  all {N:,} reconnected at once: "
        + (
            f"every user had every message after {t_all:.2f} s "
            f"({msgs / t_all:,.0f} msg/s caught up)"
            if t_all
            else f"NOT all done: {done:,} users done, {tot('failed_users'):,} failed, "
            f"{msgs:,} of {N * M:,} messages"
        ),
        f"  per-user completion: {common.fmt_lat(completion)}; {result['requests']:,} requests",
        "  failures: " + (", ".join(f"{k} {v}" for k, v in sorted(failures.items())) or "none"),
        "  correctness: " + ", ".join(f"{k} {v}" for k, v in bad_counts.items()),
    ]
    gen = f"  load generator: {procs} proc(s)" + (f" on CPUs {gen_cpus}" if gen_cpus else "")
    gen += f", CPU {'/'.join(f'{c:.0f}%' for c in cpu_per_proc)} of a core"
    if srv_cpu is not None:
        gen += f"; server (CPUs {server_cpus}): {srv_cpu:.0f}% (python {srv_py:.0f}%, "
        gen += f"postgres {srv_pg:.0f}%)"
    lines.append(gen)
    if contended:
        lines.append(
            "  WARNING: other processes competed for the pinned CPUs "
            f"(server CPUs {foreign_srv}%, generator CPUs {foreign_gen}%): rerun on a quiet machine"
        )
    if saturated:
        lines.append("  WARNING: load generator saturated: the time is an upper bound")
    lines += common.first_error_lines(first_error)
    lines += common.server_warnings(problems, server_exit)
    common.emit(result, "\n".join(lines), args.json)
    if args.plot:
        from . import plot

        top = max(buckets) if buckets else 0
        xs = [k * BUCKET_S for k in range(top + 1)]
        plot.write_run(
            args.json,
            "storm",
            result,
            f"bench storm: {N:,} users x {M:,} messages reconnect at once; "
            f"all done after {f'{t_all:.2f}' if t_all is not None else '-'} s\n",
            [
                (
                    "series",
                    "messages caught up per second",
                    "messages/s",
                    {"catch-up": (xs, [buckets.get(k, 0) / BUCKET_S for k in range(top + 1)])},
                ),
                (
                    "series",
                    "users holding every message",
                    "users",
                    {"done": ([x[0] for x in timeline], [x[2] for x in timeline])},
                ),
                (
                    "cdf",
                    "time from the storm's start until a user holds all its messages",
                    {"per-user completion": [x / 1e6 for x in done_ns]},
                ),
            ],
        )
    bad = any(bad_counts.values()) or not all_done
    return 1 if bad else 0
