"""``python -m bench pairs``: P sender/receiver pairs, ``s{i}`` sends to ``r{i}``.

Closed loop (``--mode closed``): every sender keeps ``--window`` sends in
flight; each ``ok`` lets it send another. Throughput is what the server
sustains; latency is measured from the actual send.

Open loop (``--mode open``): ``--rate`` messages per second in total, each
sender on a fixed schedule (rate/P per sender, phases spread evenly). A send
that is due goes out even if acks lag (all overdue sends of a sender go in one
write), and latency is measured from the *scheduled* time, so a stalled server
shows up as latency instead of being hidden by a slower sender (no coordinated
omission).

Each message carries ``meta: {"t": <scheduled or send time, perf_counter_ns>}``;
a pair's sender and receiver live in the same worker process, so the receiver
measures send-to-delivery from it. Correctness on the way: the receiver expects
seqs last_seq+1, +2, ... of the pair's conversation (``last_seq`` read with
``sync`` before the start) and counts gaps and duplicates; senders check that
acks arrive in increasing seq order; after the drain, ``undelivered`` counts
acked messages the receiver never got and ``unacked`` sends never answered.
"""

from __future__ import annotations

import argparse
import array
import os
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from . import common
from .common import NS, BenchError, Closed, now_ns, trio_deadline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=100, help="sender/receiver pairs (default 100)")
    p.add_argument(
        "--transport",
        choices=("tcp", "ws", "ws-json"),
        default="tcp",
        help="tcp (MessagePack frames), ws (binary MessagePack), ws-json (JSON text)",
    )
    p.add_argument(
        "--mode",
        choices=("closed", "open"),
        default="closed",
        help="closed: --window sends in flight per sender; open: fixed --rate schedule",
    )
    p.add_argument(
        "--window", type=int, default=8, help="closed loop: unacked sends per sender (default 8)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: total offered messages/s over all senders (required with --mode open)",
    )
    p.add_argument(
        "--body-bytes", type=int, default=32, help="message body size in bytes (default 32)"
    )


# ---------------------------------------------------------------- worker


class Pair:
    __slots__ = (
        "ack_ooo",
        "conv",
        "dups",
        "expected",
        "gaps",
        "idx",
        "inflight",
        "last_ack_seq",
        "next_n",
        "phase_ns",
        "rconn",
        "receiver",
        "sconn",
        "sender",
    )

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.sender = f"s{idx}"
        self.receiver = f"r{idx}"
        a, b = sorted((self.sender, self.receiver))
        self.conv = f"d:{a}:{b}"
        self.sconn: Any = None
        self.rconn: Any = None
        self.next_n = 1
        self.inflight: dict[int, int] = {}
        self.last_ack_seq = 0
        self.expected = 1
        self.gaps = 0
        self.dups = 0
        self.ack_ooo = 0
        self.phase_ns = 0


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self.sent_win = 0
        self.acked_win = 0
        self.delivered_win = 0
        self.errors: Counter[str] = Counter()
        self.kicked: Counter[str] = Counter()
        self.closed = 0
        self.stray = 0
        self.ack_lat = array.array("q")
        self.del_lat = array.array("q")
        self.sched_lag = array.array("q")


def worker(spec: dict[str, Any], link: common.WorkerLink) -> None:
    result = trio.run(_worker, spec, link)
    link.result(result)


async def _worker(spec: dict[str, Any], link: common.WorkerLink) -> dict[str, Any]:
    async with trio.open_nursery() as background:  # trio-websocket's reader tasks
        try:
            return await _run_pairs(spec, link, background)
        finally:
            background.cancel_scope.cancel()


async def _run_pairs(
    spec: dict[str, Any], link: common.WorkerLink, background: trio.Nursery
) -> dict[str, Any]:
    connect = common.connector(spec["transport"], spec["host"], spec["port"], background)
    limiter = trio.CapacityLimiter(spec["auth_concurrency"])
    tokens: dict[str, str] = spec["tokens"]
    new_tokens: dict[str, str] = {}
    pairs = [Pair(i) for i in spec["pairs"]]
    mode = spec["mode"]
    window = spec["window"]
    body = "x" * spec["body_bytes"]
    run_id = spec["run_id"]
    st = Stats()

    # -- setup: connect + authenticate both sides, read the conversation's last seq.
    async def login(user: str) -> Any:
        conn, tok = await common.open_authed(connect, user, tokens.get(user), limiter)
        if tok and tok != tokens.get(user):
            new_tokens[user] = tok
            link.tokens({user: tok})  # saved even if a later step fails
        return conn

    async def setup(p: Pair) -> None:
        p.sconn = await login(p.sender)
        p.rconn = await login(p.receiver)
        reply = await common.request(p.sconn, {"op": "sync", "rid": 1})
        if reply["op"] != "ok":
            raise BenchError(
                f"{p.sender}: sync failed: {reply.get('code')}: {reply.get('message')}"
            )
        last = 0
        for c in reply.get("convs", []):
            if c.get("conv") == p.conv:
                last = int(c.get("last_seq") or 0)
        p.expected = last + 1
        p.last_ack_seq = last

    async def keepalive() -> None:
        # Setup can be slow (argon2 on first run, other workers), so a
        # connection could sit silent past heartbeat_timeout: from setup to
        # the end, ping every connection open so far every HEARTBEAT_S.
        while True:
            await trio.sleep(common.HEARTBEAT_S)
            await ping_all()

    async def ping_all() -> None:
        for p in pairs:
            for c in (p.sconn, p.rconn):
                if c is not None:
                    try:
                        await c.send_frames([{"op": "ping"}])
                    except Closed:
                        pass

    background.start_soon(keepalive)
    try:
        async with trio.open_nursery() as n:
            for p in pairs:
                n.start_soon(setup, p)
    except BaseException:
        await _close_all(pairs)
        raise
    link.ready({"connections": 2 * len(pairs)})
    t0 = await link.wait_start()
    w0 = t0 + int(spec["warmup"] * NS)
    w1 = w0 + int(spec["duration"] * NS)
    drain_end = w1 + int(common.MAX_DRAIN_S * NS)
    cpu: dict[str, float] = {}

    def make(p: Pair, t: int) -> dict[str, Any]:
        n = p.next_n
        p.next_n = n + 1
        p.inflight[n] = t
        return {
            "op": "send",
            "rid": n,
            "to": p.receiver,
            "cid": f"{run_id}.{n}",
            "body": body,
            "meta": {"t": t},
        }

    async def sender_reader(p: Pair) -> None:
        receive = p.sconn.receive
        send_frames = p.sconn.send_frames
        inflight = p.inflight
        ack_lat = st.ack_lat
        closed_loop = mode == "closed"
        try:
            while True:
                frames = await receive()
                now = now_ns()
                for f in frames:
                    op = f.get("op")
                    if op == "ok":
                        t = inflight.pop(f.get("rid"), None)
                        if t is None:
                            st.stray += 1
                            continue
                        seq = f.get("seq")
                        if seq is not None:
                            if seq <= p.last_ack_seq:
                                p.ack_ooo += 1
                            else:
                                p.last_ack_seq = seq
                        st.acked += 1
                        if w0 <= now < w1:
                            st.acked_win += 1
                        if w0 <= t < w1:
                            ack_lat.append(now - t)
                    elif op == "error":
                        inflight.pop(f.get("rid"), None)
                        st.errors[str(f.get("code"))] += 1
                    elif op == "kicked":
                        st.kicked[str(f.get("reason"))] += 1
                if closed_loop and now < w1:
                    k = window - len(inflight)
                    if k > 0:
                        t = now_ns()
                        batch = [make(p, t) for _ in range(k)]
                        st.sent += k
                        if t >= w0:
                            st.sent_win += k
                        await send_frames(batch)
        except Closed:
            st.closed += 1

    async def receiver_reader(p: Pair) -> None:
        receive = p.rconn.receive
        conv = p.conv
        del_lat = st.del_lat
        try:
            while True:
                frames = await receive()
                now = now_ns()
                for f in frames:
                    op = f.get("op")
                    if op == "msg":
                        if f.get("conv") != conv:
                            st.stray += 1
                            continue
                        seq = f.get("seq")
                        if seq == p.expected:
                            p.expected = seq + 1
                        elif seq < p.expected:
                            p.dups += 1
                            continue
                        else:
                            p.gaps += seq - p.expected
                            p.expected = seq + 1
                        st.delivered += 1
                        if w0 <= now < w1:
                            st.delivered_win += 1
                        meta = f.get("meta")
                        t = meta.get("t") if type(meta) is dict else None
                        if t is not None and w0 <= t < w1:
                            del_lat.append(now - t)
                    elif op == "kicked":
                        st.kicked[str(f.get("reason"))] += 1
                    elif op == "error":
                        st.errors[str(f.get("code"))] += 1
        except Closed:
            st.closed += 1

    async def closed_starter(p: Pair) -> None:
        await trio.sleep_until(trio_deadline(t0))
        t = now_ns()
        st.sent += window
        try:
            await p.sconn.send_frames([make(p, t) for _ in range(window)])
        except Closed:
            pass

    async def open_scheduler(p: Pair, interval: int) -> None:
        t = t0 + p.phase_ns
        lag = st.sched_lag
        send_frames = p.sconn.send_frames
        try:
            while t < w1:
                now = now_ns()
                if t > now:
                    await trio.sleep_until(trio_deadline(t))
                    now = now_ns()
                batch = []
                while t <= now and t < w1:
                    batch.append(make(p, t))
                    if t >= w0:
                        st.sent_win += 1
                        lag.append(now - t)
                    t += interval
                st.sent += len(batch)
                await send_frames(batch)
        except Closed:
            pass

    async def reporter() -> None:
        next_t = t0
        while True:
            next_t += NS // 2
            await trio.sleep_until(trio_deadline(next_t))
            link.progress(
                {
                    "sent": st.sent,
                    "acked": st.acked,
                    "delivered": st.delivered,
                    "errors": sum(st.errors.values()),
                    "inflight": sum(len(p.inflight) for p in pairs),
                }
            )

    def settled() -> bool:
        return all(not p.inflight and p.expected - 1 >= p.last_ack_seq for p in pairs)

    async def cpu_probe() -> None:
        await trio.sleep_until(trio_deadline(w0))
        cpu["c0"], cpu["q0"], cpu["t0"] = common.cpu_seconds(), common.runqueue_wait_s(), now_ns()
        await trio.sleep_until(trio_deadline(w1))
        cpu["c1"], cpu["q1"], cpu["t1"] = common.cpu_seconds(), common.runqueue_wait_s(), now_ns()

    drained_at = None
    with trio.move_on_at(trio_deadline(drain_end + NS)):
        async with trio.open_nursery() as n:
            for p in pairs:
                n.start_soon(sender_reader, p)
                n.start_soon(receiver_reader, p)
            if mode == "closed":
                for p in pairs:
                    n.start_soon(closed_starter, p)
            else:
                per_sender = spec["rate"] / spec["total_pairs"]
                interval = int(NS / per_sender)
                for p in pairs:
                    p.phase_ns = int(p.idx * NS / spec["rate"]) % max(interval, 1)
                    n.start_soon(open_scheduler, p, interval)
            n.start_soon(reporter)
            n.start_soon(cpu_probe)
            await trio.sleep_until(trio_deadline(w1))
            while now_ns() < drain_end and not settled():  # noqa: ASYNC110 - bounded poll
                await trio.sleep(0.01)
            drained_at = now_ns()
            n.cancel_scope.cancel()
    await _close_all(pairs)

    cpu_pct = wait_pct = None
    if "c1" in cpu:
        wall = (cpu["t1"] - cpu["t0"]) / NS
        cpu_pct = (cpu["c1"] - cpu["c0"]) / wall * 100
        wait_pct = (cpu["q1"] - cpu["q0"]) / wall * 100
    return {
        "pid": os.getpid(),
        "pairs": len(pairs),
        "sent": st.sent,
        "acked": st.acked,
        "delivered": st.delivered,
        "sent_win": st.sent_win,
        "acked_win": st.acked_win,
        "delivered_win": st.delivered_win,
        "errors": dict(st.errors),
        "kicked": dict(st.kicked),
        "closed": st.closed,
        "stray": st.stray,
        "gaps": sum(p.gaps for p in pairs),
        "dups": sum(p.dups for p in pairs),
        "ack_out_of_order": sum(p.ack_ooo for p in pairs),
        "undelivered": sum(max(0, p.last_ack_seq - (p.expected - 1)) for p in pairs),
        "unacked": sum(len(p.inflight) for p in pairs),
        "drain_s": round(((drained_at or drain_end) - w1) / NS, 3),
        "cpu_pct": cpu_pct,
        "runqueue_wait_pct": wait_pct,
        "ack_lat": st.ack_lat.tobytes(),
        "del_lat": st.del_lat.tobytes(),
        "sched_lag": st.sched_lag.tobytes(),
    }


async def _close_all(pairs: list[Pair]) -> None:
    with trio.move_on_after(3):
        async with trio.open_nursery() as n:
            for p in pairs:
                for c in (p.sconn, p.rconn):
                    if c is not None:
                        n.start_soon(c.aclose)


# ---------------------------------------------------------------- parent


def _samples(results: list[dict[str, Any]], key: str) -> array.array[int]:
    out = array.array("q")
    for r in results:
        out.frombytes(r[key])
    return out


def run(args: argparse.Namespace) -> int:
    if args.pairs < 1:
        raise BenchError("--pairs must be at least 1")
    if args.mode == "open":
        if not args.rate or args.rate <= 0:
            raise BenchError("--mode open needs --rate N (total messages/s, N > 0)")
    elif args.window < 1:
        raise BenchError("--window must be at least 1")
    if not 0 <= args.body_bytes <= 16384:
        raise BenchError("--body-bytes must be within 0..16384 (the server's max_body_bytes)")
    if args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be > 0 and --warmup >= 0")
    if args.warmup + args.duration > 100:
        raise BenchError("--warmup + --duration is capped at 100 s (a run stays under 2 minutes)")
    if args.plot:
        from . import plot

        plot.require()
    procs = max(1, min(args.procs, args.pairs))
    common.check_loopback(args.host)
    port = args.port or common.DEFAULT_PORTS[args.transport]

    env = common.environment()
    server = None
    gen_cpus, server_cpus = common.choose_cpus(args.cpu, args.server_cpu, args.spawn_server)
    try:
        if args.spawn_server:
            config = Path(args.server_config).resolve()
            server = common.SpawnedServer(config, server_cpus, host="127.0.0.1")
            common.require_spawn_host(args.host)
            if port not in (server.tcp_port, server.ws_port):
                raise BenchError(f"--port {port} is not a port of {config}")
            common.start_server(server, config, server_cpus)
        if gen_cpus is not None:
            common.set_affinity(common.parse_cpus(gen_cpus))
        tokens = common.load_tokens()
        run_id = f"{int(time.time()):x}{secrets.token_hex(3)}"
        specs = []
        for w in range(procs):
            idx = list(range(w, args.pairs, procs))
            specs.append(
                {
                    "transport": args.transport,
                    "host": args.host,
                    "port": port,
                    "mode": args.mode,
                    "window": args.window,
                    "rate": args.rate,
                    "total_pairs": args.pairs,
                    "pairs": idx,
                    "body_bytes": args.body_bytes,
                    "warmup": args.warmup,
                    "duration": args.duration,
                    "run_id": f"{run_id}{w}",
                    "auth_concurrency": max(1, 4 // procs),
                    "tokens": {
                        u: tokens[u] for i in idx for u in (f"s{i}", f"r{i}") if u in tokens
                    },
                }
            )

        prev: dict[str, Any] = {}
        timeline: list[tuple[float, float, float]] = []

        def progress_line(phase: str, t: float, latest: list[dict[str, Any]]) -> str:
            tot = {
                k: sum(d.get(k, 0) for d in latest)
                for k in ("sent", "acked", "delivered", "errors", "inflight")
            }
            dt = t - prev.get("t", 0.0) if prev else t
            rate = {
                k: (tot[k] - prev.get(k, 0)) / dt if dt > 0 else 0.0 for k in ("acked", "delivered")
            }
            prev.update(tot, t=t)
            timeline.append((t, rate["acked"], rate["delivered"]))
            return (
                f"bench {phase:7s} {t:5.1f}s  acked {rate['acked']:8,.0f}/s  "
                f"delivered {rate['delivered']:8,.0f}/s  inflight {tot['inflight']:6,d}  "
                f"errors {tot['errors']:,d}"
            )

        try:
            results, observed = common.run_workers(
                "bench.pairs",
                specs,
                warmup=args.warmup,
                duration=args.duration,
                setup_timeout=common.SETUP_TIMEOUT_S,
                progress_line=progress_line,
                server=server,
                progress=common.Progress(not args.quiet),
                tokens=tokens,
            )
        finally:
            common.save_tokens(tokens)
    finally:
        server_exit, problems = common.stop_server(server)

    dur = args.duration
    errors: Counter[str] = Counter()
    kicked: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
        kicked.update(r["kicked"])
    ack = common.latency_summary(_samples(results, "ack_lat"))
    dlv = common.latency_summary(_samples(results, "del_lat"))
    lag = common.latency_summary(_samples(results, "sched_lag")) if args.mode == "open" else None
    cpu_per_proc = [round(r["cpu_pct"], 1) for r in results if r["cpu_pct"] is not None]
    cpu_max = max(cpu_per_proc) if cpu_per_proc else None
    # Saturated: one process near a full core, or (pinned) all of them together
    # near the capacity of the CPUs they share.
    saturated = cpu_max is not None and cpu_max > common.SATURATED_PCT
    if gen_cpus is not None and cpu_per_proc:
        gen_cores = len(common.parse_cpus(gen_cpus))
        own_total = sum(cpu_per_proc) + (observed.get("parent_cpu_pct") or 0.0)
        saturated = saturated or own_total > common.SATURATED_PCT * gen_cores
    gen_wait = [
        round(r["runqueue_wait_pct"], 1) for r in results if r["runqueue_wait_pct"] is not None
    ]
    srv_wait = observed.get("server_runqueue_wait_pct")
    # What other processes used on the CPUs we pinned to: busy time of those
    # CPUs minus our own processes' CPU time (only meaningful when pinned).
    busy = observed.get("cpu_busy_pct") or {}
    foreign_gen, foreign_srv = common.foreign_cpu(
        busy,
        gen_cpus,
        server_cpus,
        sum(cpu_per_proc) + (observed.get("parent_cpu_pct") or 0.0) if cpu_per_proc else None,
        observed.get("server_cpu_pct") if args.spawn_server else None,
    )
    contended = common.is_contended(foreign_gen, foreign_srv)

    def tot(k: str) -> int:
        return sum(int(r[k]) for r in results)

    result: dict[str, Any] = {
        "bench": "pairs",
        **env,
        "transport": args.transport,
        "mode": args.mode,
        "pairs": args.pairs,
        "window": args.window if args.mode == "closed" else None,
        "rate": args.rate if args.mode == "open" else None,
        "duration_s": dur,
        "warmup_s": args.warmup,
        "body_bytes": args.body_bytes,
        "procs": procs,
        "loadgen_cpus": gen_cpus,
        "spawn_server": bool(args.spawn_server),
        "server_cpus": server_cpus if args.spawn_server else None,
        "fsync": True if args.spawn_server else None,
        "sent_per_s": round(tot("sent_win") / dur, 1),
        "acked_per_s": round(tot("acked_win") / dur, 1),
        "delivered_per_s": round(tot("delivered_win") / dur, 1),
        "ack_latency_ms": ack,
        "delivery_latency_ms": dlv,
        "sched_lag_ms": lag,
        "sent": tot("sent"),
        "acked": tot("acked"),
        "delivered": tot("delivered"),
        "errors": dict(errors),
        "kicked": dict(kicked),
        "connections_closed": tot("closed"),
        "gaps": tot("gaps"),
        "dups": tot("dups"),
        "ack_out_of_order": tot("ack_out_of_order"),
        "undelivered": tot("undelivered"),
        "unacked": tot("unacked"),
        "stray_frames": tot("stray"),
        "drain_s": max(r["drain_s"] for r in results),
        "setup_s": observed.get("setup_s"),
        "loadgen_cpu_pct": cpu_per_proc,
        "loadgen_saturated": saturated,
        "loadgen_runqueue_wait_pct": gen_wait,
        "server_cpu_pct": observed.get("server_cpu_pct"),
        "server_python_cpu_pct": observed.get("server_python_cpu_pct"),
        "server_postgres_cpu_pct": observed.get("server_postgres_cpu_pct"),
        "server_runqueue_wait_pct": srv_wait,
        "server_cpu_us_per_msg": (
            round(observed["server_cpu_pct"] / 100 / (tot("acked_win") / dur) * 1e6, 1)
            if observed.get("server_cpu_pct") is not None and tot("acked_win")
            else None
        ),
        **common.contention_fields(busy, foreign_gen, foreign_srv, contended),
        "server_exit_code": server_exit,
        "server_log_problems": len(problems),
    }

    mode = (
        f"closed loop, window {args.window}"
        if args.mode == "closed"
        else f"open loop, {args.rate:,.0f} msg/s offered"
    )
    lines = [
        f"bench pairs: {args.transport}, {mode}, {args.pairs} pairs, {dur:g} s measured after "
        f"{args.warmup:g} s warmup, body {args.body_bytes} B",
    ]
    if args.mode == "open":
        lines.append(
            f"  offered    {common.fmt_rate(result['sent_per_s']):>9} msg/s   "
            f"schedule lag    {common.fmt_lat(lag or {})}"
        )
    lines += [
        f"  acked      {common.fmt_rate(result['acked_per_s']):>9} msg/s   "
        f"send->ack       {common.fmt_lat(ack)}",
        f"  delivered  {common.fmt_rate(result['delivered_per_s']):>9} msg/s   "
        f"send->delivery  {common.fmt_lat(dlv)}",
        "  errors: "
        + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
        + (
            "; kicked: " + ", ".join(f"{k} {v}" for k, v in sorted(kicked.items()))
            if kicked
            else ""
        )
        + (
            f"; connections closed by server: {result['connections_closed']}"
            if result["connections_closed"]
            else ""
        ),
        f"  correctness: gaps {result['gaps']}, dups {result['dups']}, acks out of order "
        f"{result['ack_out_of_order']}, undelivered {result['undelivered']}, "
        f"unacked {result['unacked']}",
    ]
    gen = f"  load generator: {procs} proc(s)" + (f" on CPUs {gen_cpus}" if gen_cpus else "")
    gen += f", CPU {'/'.join(f'{c:.0f}%' for c in cpu_per_proc)} of a core"
    if result["server_cpu_pct"] is not None:
        gen += (
            f"; server (CPUs {server_cpus}): {result['server_cpu_pct']:.0f}% "
            f"(python {result['server_python_cpu_pct']:.0f}%, "
            f"postgres {result['server_postgres_cpu_pct']:.0f}%)"
        )
        if result["server_cpu_us_per_msg"] is not None:
            gen += f", {result['server_cpu_us_per_msg']:.0f} us CPU per acked message"
    lines.append(gen)

    def fmt(x: float | None) -> str:
        return "?" if x is None else f"{x:.0f}%"

    lines.append(
        f"  other processes' CPU on the pinned CPUs: server CPUs {fmt(foreign_srv)}, "
        f"load generator CPUs {fmt(foreign_gen)}; load average "
        f"{result['loadavg_1m_before']:.1f} -> {result['loadavg_1m_after']:.1f}"
    )
    if contended:
        lines.append(
            "  WARNING: other processes competed for the pinned CPUs: figures are disturbed; "
            "rerun on a quiet machine"
        )
    if saturated:
        hint = (
            "use --procs with more CPUs in --cpu"
            if gen_cpus is not None and len(common.parse_cpus(gen_cpus)) <= procs
            else "use --procs"
        )
        lines.append(f"  WARNING: load generator saturated: results are a lower bound; {hint}")
    bad = result["gaps"] or result["dups"] or result["ack_out_of_order"] or result["undelivered"]
    if bad:
        lines.append("  WARNING: correctness check failed (see counts above)")
    if result["unacked"]:
        lines.append(
            f"  WARNING: {result['unacked']:,} sends were still unanswered "
            f"{common.MAX_DRAIN_S:g} s after the window: the server has a backlog "
            "(overloaded); latencies above exclude them"
        )
    lines += common.server_warnings(problems, server_exit)
    common.emit(result, "\n".join(lines), args.json)
    if args.plot:
        from . import plot

        ack_ms = [x / 1e6 for x in _samples(results, "ack_lat")]
        del_ms = [x / 1e6 for x in _samples(results, "del_lat")]
        title = (
            f"bench pairs: {args.transport}, {mode}, {args.pairs} pairs; "
            f"acked {result['acked_per_s']:,.0f}/s\n"
        )
        plot.write_run(
            args.json,
            "pairs",
            result,
            title,
            plot.ack_delivery_panels(ack_ms, del_ms, timeline),
        )
    return 1 if bad else 0
