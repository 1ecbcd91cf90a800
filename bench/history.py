"""``python -m bench history``: HTTP history and search reads per second.

Users ``hist0`` .. ``hist{U-1}`` (``--users``); user ``i`` has a direct
conversation with each of its ``--partners`` P nearest neighbours on a ring
(``i±1``, ``i±2``, ... mod U), U*P/2 conversations in all. Phases:

1. **Register** every user without a cached token (framed ``register`` over
   TCP; with ``bench/storm.toml``, the default config with
   ``--spawn-server``, argon2 is cheap).
2. **Seed** (not measured): every user connects over TCP and ``sync``s; each
   conversation holding fewer than ``--messages`` M entries is topped up to
   M through the framed protocol (``send``, closed loop, ``--window`` in
   flight per connection; the two members take turns), so seqs are real and
   every message went through the durable group commit. A later run on the
   same data dir finds them seeded and skips this. Bodies are 4-9 words, a
   deterministic mix of common English and Chinese words (``COMMON``), and
   about one message in 200 also holds a rare word (``RARE``).
3. **Load** (measured): C HTTP clients (``--clients``, dealt over ``--procs``
   generator processes), each one keep-alive connection, closed loop: a
   client sends its next request when the previous one is answered. Each
   request is made for a random user (its token as ``Authorization:
   Bearer``): with probability ``--search-share`` a search
   (``GET /api/v1/search?q=&limit=20``: a common word, or a rare one with
   ``--rare-share``, restricted to one of the user's conversations with
   ``conv=`` with ``--conv-share``), else a history page
   (``GET /api/v1/conversations/{conv}/messages?before_seq=&limit=50``, a
   random conversation of the user, ``before_seq`` uniform in
   2..last_seq+1).

Answers are counted when they arrive in the window [t0+warmup,
t0+warmup+duration); their latency is from the request's first byte sent to
the last byte of the answer. After the window the clients stop and wait at
most 5 s for the answers in flight. A share (``--check-share``) of the 200
answers is parsed and checked: history pages ascending by seq, below
``before_seq``, of the asked conversation, at most ``limit`` items; search
results of the caller's conversations (of ``conv`` when given), every body
containing ``q`` (ASCII case-insensitively), at most ``limit``.

Two HTTP clients (``--client``): ``h11`` (default: h11 directly on a Trio
socket stream, the same h11 the server's hypercorn uses) and ``httpx`` (one
``httpx.AsyncClient`` per generator process with a pool of keep-alive
connections; Trio through anyio). See bench/README.md for their cost.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import time
import tomllib
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import h11
import trio

from . import common
from .common import NS, BenchError, Closed, now_ns, trio_deadline

PREFIX = "hist"
DEFAULT_CONFIG = common.BENCH_DIR / "storm.toml"
DEFAULT_HTTP_PORT = 7780
BUCKET_S = 0.25
HISTORY_LIMIT = 50
SEARCH_LIMIT = 20
REQUEST_TIMEOUT_S = 30.0
KINDS = ("history", "search_common", "search_rare", "search_conv")

COMMON = (
    "meeting",
    "tomorrow",
    "project",
    "coffee",
    "deadline",
    "review",
    "lunch",
    "weekend",
    "report",
    "budget",
    "release",
    "customer",
    "你好",
    "明天",
    "开会",
    "项目",
    "咖啡",
    "周末",
    "报告",
    "预算",
    "发布",
    "客户",
    "谢谢",
    "晚饭",
)
RARE = ("zyzzyva", "quokka", "鲲鹏", "量子纠缠")
RARE_EVERY = 200


def body_for(conv_index: int, k: int) -> str:
    """The k-th seeded body of a conversation: 4-9 common words, now and then a rare one."""
    rng = random.Random(conv_index * 1_000_003 + k)
    words = [rng.choice(COMMON) for _ in range(rng.randint(4, 9))]
    if rng.randrange(RARE_EVERY) == 0:
        words.insert(rng.randrange(len(words) + 1), rng.choice(RARE))
    return f"{k}: " + " ".join(words)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--users", type=int, default=100, help="users U (default 100)")
    p.add_argument(
        "--partners",
        type=int,
        default=10,
        help="direct conversations per user, even, < U (default 10: U*5 conversations)",
    )
    p.add_argument(
        "--messages", type=int, default=200, help="messages M per conversation (default 200)"
    )
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients C (default 64)")
    p.add_argument(
        "--search-share",
        type=float,
        default=0.2,
        help="share of requests that are searches, the rest history pages (default 0.2)",
    )
    p.add_argument(
        "--rare-share",
        type=float,
        default=0.2,
        help="share of searches for a rare word (found in ~1 of 200 messages) (default 0.2)",
    )
    p.add_argument(
        "--conv-share",
        type=float,
        default=0.3,
        help="share of searches restricted to one conversation with conv= (default 0.3)",
    )
    p.add_argument(
        "--check-share",
        type=float,
        default=0.1,
        help="share of 200 answers parsed and checked (default 0.1)",
    )
    p.add_argument(
        "--client",
        choices=("h11", "httpx"),
        default="h11",
        help="HTTP client: h11 on a Trio stream, or httpx.AsyncClient (default h11)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="the server's HTTP port (default: [http] port of the config, else 7780)",
    )
    p.add_argument(
        "--window", type=int, default=32, help="seeding: sends in flight per user (default 32)"
    )
    p.add_argument(
        "--seed-timeout",
        type=float,
        default=600.0,
        help="seconds registration + seeding may take at most (default 600)",
    )


# ------------------------------------------------------------ conversations


def conversations(users: int, partners: int) -> list[tuple[int, int]]:
    """The (a, b) user index pairs, a < b as strings sort (the conv id's order)."""
    out = set()
    for i in range(users):
        for d in range(1, partners // 2 + 1):
            j = (i + d) % users
            a, b = sorted((f"{PREFIX}{i}", f"{PREFIX}{j}"))
            out.add((int(a[len(PREFIX) :]), int(b[len(PREFIX) :])))
    return sorted(out)


def conv_id(a: int, b: int) -> str:
    x, y = sorted((f"{PREFIX}{a}", f"{PREFIX}{b}"))
    return f"d:{x}:{y}"


# ---------------------------------------------------- registration and seeding


async def _prepare(
    args: argparse.Namespace,
    port: int,
    tokens: dict[str, str],
    progress: common.Progress,
) -> dict[str, Any]:
    """Register, connect everyone, top every conversation up to M; return last seqs."""
    from .storm import _register

    U, M = args.users, args.messages
    names = [f"{PREFIX}{i}" for i in range(U)]
    missing = [u for u in names if u not in tokens]
    t = time.monotonic()
    if missing:
        print(f"bench: registering {len(missing):,} users", file=sys.stderr)
        await _register(args.host, port, missing, tokens, progress, args.seed_timeout)
    register_s = time.monotonic() - t
    pairs = conversations(U, args.partners)
    conns: dict[int, common.Conn] = {}
    limiter = trio.CapacityLimiter(16)

    async def connect(i: int) -> None:
        user = names[i]
        conn, tok = await common.open_authed(
            lambda: common.TcpConn.open(args.host, port), user, tokens.get(user), limiter
        )
        tokens[user] = tok
        conns[i] = conn

    rid = [10]
    # Every conversation each user is in, as sync lists them: an earlier run
    # with other --users/--partners on the same data dir may have made more.
    member: dict[int, set[str]] = {}

    async def last_seqs() -> dict[str, int]:
        out: dict[str, int] = {}

        async def one(i: int) -> None:
            rid[0] += 1
            reply = await common.request(conns[i], {"op": "sync", "rid": rid[0]})
            if reply.get("op") != "ok":
                raise BenchError(f"{names[i]}: sync failed: {reply.get('code')}")
            member[i] = set()
            for cv in reply.get("convs", []):
                out[str(cv.get("conv"))] = int(cv.get("last_seq") or 0)
                member[i].add(str(cv.get("conv")))

        async with trio.open_nursery() as n:
            for i in range(U):
                n.start_soon(one, i)
        return out

    st = {"acked": 0}
    errors: Counter[str] = Counter()

    async def sender(i: int, todo: list[tuple[int, int]]) -> None:
        """Send ``todo`` (conv index, k) from user i, --window in flight."""
        conn = conns[i]
        todo = list(reversed(todo))
        inflight: dict[int, tuple[int, int]] = {}
        r = 0
        while todo or inflight:
            batch = []
            while todo and len(inflight) < args.window:
                ci, k = todo.pop()
                a, b = pairs[ci]
                r += 1
                inflight[r] = (ci, k)
                batch.append(
                    {
                        "op": "send",
                        "rid": r,
                        "to": names[b if a == i else a],
                        "cid": f"{run_id}.{ci}.{k}",
                        "body": body_for(ci, k),
                    }
                )
            if batch:
                await conn.send_frames(batch)
            for f in await conn.receive():
                op = f.get("op")
                if op == "ok" and f.get("rid") in inflight:
                    inflight.pop(f["rid"])
                    st["acked"] += 1
                elif op == "error" and f.get("rid") in inflight:
                    code = str(f.get("code"))
                    errors[code] += 1
                    item = inflight.pop(f["rid"])
                    if code in ("rate_limited", "unavailable") and errors[code] < 10_000:
                        todo.append(item)  # same cid: idempotent
                        await trio.sleep(float(f.get("retry_after") or 0.2))
                    else:
                        raise BenchError(f"{names[i]}: send failed: {code}: {f.get('message')}")
                elif op == "kicked":
                    raise BenchError(f"{names[i]} kicked while seeding: {f.get('reason')}")

    run_id = f"h{int(time.time()):x}{secrets.token_hex(2)}"
    t_seed = time.monotonic()
    with trio.fail_after(args.seed_timeout):
        async with trio.open_nursery() as n:
            for i in range(U):
                n.start_soon(connect, i)
        try:
            before = await last_seqs()
            plan: dict[int, list[tuple[int, int]]] = {i: [] for i in range(U)}
            need = 0
            for ci, (a, b) in enumerate(pairs):
                have = before.get(conv_id(a, b), 0)
                for k in range(have, M):
                    plan[a if k % 2 == 0 else b].append((ci, k))
                    need += 1
            if need:
                print(
                    f"bench: seeding {need:,} messages into {len(pairs):,} conversations "
                    f"(up to {M} each)",
                    file=sys.stderr,
                )

                async def show() -> None:
                    while True:
                        await trio.sleep(1)
                        progress.show(
                            f"bench seed {time.monotonic() - t_seed:6.1f}s  acked "
                            f"{st['acked']:8,d}/{need:,}"
                        )

                async with trio.open_nursery() as n:
                    n.start_soon(show)
                    async with trio.open_nursery() as m:
                        for i in range(U):
                            if plan[i]:
                                m.start_soon(sender, i, plan[i])
                    n.cancel_scope.cancel()
                progress.done()
            after = await last_seqs() if need else before
        finally:
            for conn in conns.values():
                await conn.aclose()
    seed_s = time.monotonic() - t_seed
    last = {}
    for a, b in pairs:
        c = conv_id(a, b)
        if after.get(c, 0) < M:
            raise BenchError(f"seeding: {c} has last_seq {after.get(c, 0)} < {M}")
        last[c] = after[c]
    return {
        "register_s": round(register_s, 1),
        "registered": len(missing),
        "seeded": need,
        "seed_s": round(seed_s, 1),
        "seed_errors": dict(errors),
        "last": last,
        "member": {i: sorted(v) for i, v in member.items()},
        "pairs": pairs,
    }


# ---------------------------------------------------------------- HTTP clients


class H11Client:
    """One keep-alive HTTP/1.1 connection: h11 on a Trio socket stream."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}"
        self.stream: trio.SocketStream | None = None
        self.conn: h11.Connection | None = None
        self.reconnects = -1

    async def _connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        self.conn = h11.Connection(h11.CLIENT)
        self.reconnects += 1

    def _drop(self) -> None:
        """Close the socket at once (no checkpoint: safe while being cancelled)."""
        stream, self.stream, self.conn = self.stream, None, None
        if stream is not None:
            stream.socket.close()

    async def close(self) -> None:
        stream, self.stream, self.conn = self.stream, None, None
        if stream is not None:
            with trio.move_on_after(1):
                await stream.aclose()

    async def get(self, target: str, token: str) -> tuple[int, bytes]:
        """GET ``target``; (status, body). Raises OSError, Closed or h11 errors."""
        if self.stream is None:
            await self._connect()
        stream, conn = self.stream, self.conn
        assert stream is not None and conn is not None
        try:
            data = conn.send(
                h11.Request(
                    method="GET",
                    target=target,
                    headers=[("Host", self.host_header), ("Authorization", "Bearer " + token)],
                )
            )
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send_all(data)
            status = 0
            chunks = []
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(262144))
                elif isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    chunks.append(bytes(ev.data))
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    raise Closed(None, "closed before the answer")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._drop()
            raise Closed(None, str(e)) from None
        except BaseException:  # cancelled, timed out, protocol error: never reuse it
            self._drop()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.close()  # the server asked to close: next request reconnects
        return status, b"".join(chunks)


class HttpxClients:
    """One ``httpx.AsyncClient`` per generator process, pooled keep-alive connections."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        import httpx

        self.httpx = httpx
        self.client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=REQUEST_TIMEOUT_S,
        )
        self.reconnects = 0

    async def get(self, target: str, token: str) -> tuple[int, bytes]:
        try:
            r = await self.client.get(target, headers={"Authorization": "Bearer " + token})
        except self.httpx.TransportError as e:
            raise Closed(None, f"{type(e).__name__}: {e}") from None
        return r.status_code, r.content

    async def close(self) -> None:
        with trio.move_on_after(2):
            await self.client.aclose()


# ---------------------------------------------------------------- worker


def worker(spec: dict[str, Any], link: common.WorkerLink) -> None:
    link.result(trio.run(_run_history, spec, link))


def _check_history(doc: Any, conv: str, before: int) -> str | None:
    msgs = doc.get("msgs") if isinstance(doc, dict) else None
    if not isinstance(msgs, list) or not isinstance(doc.get("more"), bool):
        return "not a {msgs, more} envelope"
    if len(msgs) > HISTORY_LIMIT:
        return f"{len(msgs)} items for limit {HISTORY_LIMIT}"
    prev = 0
    for m in msgs:
        seq = int(m.get("seq") or 0)
        if seq <= prev:
            return f"seq {seq} after {prev}: not ascending"
        if seq >= before:
            return f"seq {seq} not below before_seq {before}"
        if m.get("conv") != conv:
            return f"message of {m.get('conv')} in a page of {conv}"
        prev = seq
    return None


def _check_search(doc: Any, q: str, conv: str | None, mine: set[str]) -> str | None:
    msgs = doc.get("msgs") if isinstance(doc, dict) else None
    if not isinstance(msgs, list) or not isinstance(doc.get("more"), bool):
        return "not a {msgs, more} envelope"
    if len(msgs) > SEARCH_LIMIT:
        return f"{len(msgs)} items for limit {SEARCH_LIMIT}"
    ql = q.lower()
    for m in msgs:
        if ql not in str(m.get("body", "")).lower():
            return f"body {str(m.get('body'))[:60]!r} does not contain {q!r}"
        c = m.get("conv")
        if c not in mine or (conv is not None and c != conv):
            return f"result of {c}, not a conversation of the caller{' / ' + conv if conv else ''}"
    return None


async def _run_history(spec: dict[str, Any], link: common.WorkerLink) -> dict[str, Any]:
    common.raise_nofile()
    rng = random.Random(spec["seed"])
    users: list[tuple[str, str, list[tuple[str, int]]]] = spec["users"]
    mine = {u: set(convs) for u, convs in spec["member"].items()}
    n_clients = spec["clients"]
    search_share, rare_share, conv_share = (
        spec["search_share"],
        spec["rare_share"],
        spec["conv_share"],
    )
    check_share = spec["check_share"]
    host, port = spec["host"], spec["http_port"]
    lat = {k: common.new_samples() for k in KINDS}
    count = Counter[str]()  # answers in the window, by kind
    statuses: Counter[str] = Counter()  # non-200 answers and transport failures (window)
    all_errors = [0]
    first_error: dict[str, str] = {}
    check = {"checked": 0, "bad": 0, "found": 0, "searches_checked": 0}
    buckets: Counter[tuple[str, int]] = Counter()
    totals = Counter[str]()
    cpu: dict[str, float] = {}

    if spec["client"] == "httpx":
        pool = HttpxClients(host, port, n_clients)
        clients: list[Any] = [pool] * n_clients
    else:
        clients = [H11Client(host, port) for _ in range(n_clients)]

    def next_request() -> tuple[str, str, str, Any]:
        user, token, convs = users[rng.randrange(len(users))]
        if rng.random() < search_share:
            rare = rng.random() < rare_share
            q = rng.choice(RARE if rare else COMMON)
            target = f"/api/v1/search?q={urllib.parse.quote(q)}&limit={SEARCH_LIMIT}"
            conv = None
            if rng.random() < conv_share:
                conv = rng.choice(convs)[0]
                target += "&conv=" + urllib.parse.quote(conv, safe="")
                kind = "search_conv"
            else:
                kind = "search_rare" if rare else "search_common"
            return kind, target, token, ("search", user, q, conv)
        conv, last = rng.choice(convs)
        before = rng.randint(2, last + 1)
        target = (
            f"/api/v1/conversations/{urllib.parse.quote(conv, safe=':')}/messages"
            f"?before_seq={before}&limit={HISTORY_LIMIT}"
        )
        return "history", target, token, ("history", conv, before)

    def note(kind: str, detail: str) -> None:
        first_error.setdefault(kind, detail[:300])

    # Setup: open every connection now (one cheap request each), not in the window.
    async def warm(c: Any) -> None:
        _, target, token, _ = next_request()
        with trio.fail_after(30):
            await c.get(target, token)

    try:
        async with trio.open_nursery() as n:
            for c in clients:  # httpx: C requests at once open C pooled connections
                n.start_soon(warm, c)
    except (OSError, Closed, h11.ProtocolError, trio.TooSlowError) as e:
        raise BenchError(f"cannot reach the HTTP shim at {host}:{port}: {e!r}") from None
    for c in clients:
        c.reconnects = 0

    link.ready({"clients": n_clients})
    t0 = await link.wait_start()
    w0 = t0 + int(spec["warmup"] * NS)
    w1 = w0 + int(spec["duration"] * NS)
    drain_end = w1 + int(common.MAX_DRAIN_S * NS)
    unanswered = [0]
    inflight = [0]

    async def client_loop(c: Any) -> None:
        while now_ns() < w1:
            kind, target, token, what = next_request()
            sample = rng.random() < check_share
            t = now_ns()
            status = 0
            body = b""
            err = None
            inflight[0] += 1
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    status, body = await c.get(target, token)
            except trio.TooSlowError:
                err = "timeout"
            except (OSError, Closed, h11.ProtocolError) as e:
                err = f"transport: {type(e).__name__}"
                note(err, f"{target}: {e}")
            inflight[0] -= 1
            done = now_ns()
            totals[kind] += 1
            buckets[(kind, int((done - t0) / NS / BUCKET_S))] += 1
            if err is None and status != 200:
                err = str(status)
                note(err, f"{target}: {body[:200].decode(errors='replace')}")
            if err is not None:
                all_errors[0] += 1
                if w0 <= done < w1:
                    statuses[err] += 1
                if err.startswith("transport") or err == "timeout":
                    await trio.sleep(0.1)  # do not spin on a dead server
                continue
            if w0 <= done < w1:
                count[kind] += 1
                lat[kind].append(done - t)
            if sample:
                check["checked"] += 1
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                if what[0] == "history":
                    problem = _check_history(doc, what[1], what[2])
                else:
                    problem = _check_search(doc, what[2], what[3], mine[what[1]])
                    check["searches_checked"] += 1
                    if problem is None:
                        check["found"] += len(doc["msgs"])
                if problem is not None:
                    check["bad"] += 1
                    note("bad_answer", f"{target}: {problem}")

    async def reporter() -> None:
        while True:
            await trio.sleep(0.5)
            link.progress(
                {
                    "history": totals["history"],
                    "search": sum(v for k, v in totals.items() if k != "history"),
                    "errors": all_errors[0],
                    "bad": check["bad"],
                }
            )

    async def cpu_probe() -> None:
        await trio.sleep_until(trio_deadline(w0))
        cpu["c0"], cpu["q0"], cpu["t0"] = common.cpu_seconds(), common.runqueue_wait_s(), now_ns()
        await trio.sleep_until(trio_deadline(w1))
        cpu["c1"], cpu["q1"], cpu["t1"] = common.cpu_seconds(), common.runqueue_wait_s(), now_ns()

    async with trio.open_nursery() as bg:
        bg.start_soon(reporter)
        bg.start_soon(cpu_probe)
        await trio.sleep_until(trio_deadline(t0))
        with trio.move_on_at(trio_deadline(drain_end)) as scope:
            async with trio.open_nursery() as n:
                for c in clients:
                    n.start_soon(client_loop, c)
        if scope.cancelled_caught:
            unanswered[0] = inflight[0]  # requests still unanswered after the drain
        await trio.sleep_until(trio_deadline(w1 + NS // 10))  # the probe's last sample
        bg.cancel_scope.cancel()
    reconnects = sum(c.reconnects for c in set(clients))
    for c in set(clients):
        await c.close()
    wall = (cpu["t1"] - cpu["t0"]) / NS if "t1" in cpu else 0.0
    return {
        "count": dict(count),
        "lat": {k: v.tobytes() for k, v in lat.items()},
        "statuses": dict(statuses),
        "errors_total": all_errors[0],
        "first_error": first_error,
        **check,
        "buckets": {f"{k}|{b}": v for (k, b), v in buckets.items()},
        "unanswered": unanswered[0],
        "reconnects": reconnects,
        "cpu_pct": (cpu["c1"] - cpu["c0"]) / wall * 100 if wall else None,
        "runqueue_wait_pct": (cpu["q1"] - cpu["q0"]) / wall * 100 if wall else None,
    }


# ---------------------------------------------------------------- parent


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not common._port_open(host, port):
        if time.monotonic() > deadline:
            raise BenchError(f"the HTTP shim does not listen on {host}:{port}")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> int:
    U, P, M, C = args.users, args.partners, args.messages, args.clients
    if U < 2 or M < 1 or C < 1:
        raise BenchError("--users must be at least 2, --messages and --clients at least 1")
    if P < 2 or P % 2 or P >= U:
        raise BenchError("--partners must be even, at least 2 and below --users")
    for name in ("search_share", "rare_share", "conv_share", "check_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise BenchError(f"--{name.replace('_', '-')} must be within 0..1")
    if args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be > 0 and --warmup >= 0")
    if args.warmup + args.duration > 100:
        raise BenchError("--warmup + --duration is capped at 100 s")
    if args.window < 1 or not 0 < args.seed_timeout <= 3600:
        raise BenchError("--window must be positive, --seed-timeout within 0..3600")
    if args.plot:
        from . import plot

        plot.require()
    if args.client == "httpx":
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise BenchError(
                "--client httpx needs httpx: pip install 'httpx>=0.27,<0.29'"
            ) from None
    common.check_loopback(args.host)
    procs = max(1, min(args.procs, C))
    tcp_port = args.port or common.DEFAULT_PORTS["tcp"]
    progress = common.Progress(not args.quiet)
    env = common.environment()
    server = None
    gen_cpus, server_cpus = common.choose_cpus(args.cpu, args.server_cpu, args.spawn_server)
    cfg_path = args.server_config
    if cfg_path == str(common.DEFAULT_CONFIG):
        cfg_path = str(DEFAULT_CONFIG)  # cheap argon2 for the registrations
    http_port = args.http_port
    if http_port is None:
        http_port = DEFAULT_HTTP_PORT
        if args.spawn_server:
            cfg = tomllib.loads(Path(cfg_path).read_text())
            http_port = int(cfg.get("http", {}).get("port", DEFAULT_HTTP_PORT))
    timeline: list[tuple[float, float, float]] = []
    try:
        if args.spawn_server:
            config = Path(cfg_path).resolve()
            server = common.SpawnedServer(config, server_cpus, host="127.0.0.1")
            common.require_spawn_host(args.host)
            tcp_port = server.tcp_port
            if common._port_open("127.0.0.1", http_port):
                raise BenchError(f"something already listens on 127.0.0.1:{http_port}")
            print(
                f"bench: starting server (taskset -c {server_cpus}) with {config.name} ...",
                file=sys.stderr,
            )
            t = time.monotonic()
            server.start()
            _wait_port("127.0.0.1", http_port, 30)
            print(
                f"bench: server up in {time.monotonic() - t:.1f} s (pid {server.pid})",
                file=sys.stderr,
            )
        if gen_cpus is not None:
            common.set_affinity(common.parse_cpus(gen_cpus))
        tokens = common.load_tokens()
        try:
            prep = trio.run(_prepare, args, tcp_port, tokens, progress)
        except BaseExceptionGroup as eg:
            bench_errors, rest = eg.split((BenchError, Closed))
            if rest is not None or bench_errors is None:
                raise
            first: BaseException = bench_errors
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise BenchError(f"setup: {first}") from None
        except trio.TooSlowError:
            raise BenchError(f"registration + seeding took over {args.seed_timeout:g} s") from None
        finally:
            common.save_tokens(tokens)
        convs_of: dict[int, list[tuple[str, int]]] = {i: [] for i in range(U)}
        for a, b in prep["pairs"]:
            c = conv_id(a, b)
            convs_of[a].append((c, prep["last"][c]))
            convs_of[b].append((c, prep["last"][c]))
        user_list = [(f"{PREFIX}{i}", tokens[f"{PREFIX}{i}"], convs_of[i]) for i in range(U)]
        member = {f"{PREFIX}{i}": prep["member"][i] for i in range(U)}
        visible = [sum(s for _, s in convs_of[i]) for i in range(U)]
        seed = secrets.randbits(32)
        specs = [
            {
                "client": args.client,
                "host": args.host,
                "http_port": http_port,
                "clients": len(range(w, C, procs)),
                "users": user_list,
                "member": member,
                "search_share": args.search_share,
                "rare_share": args.rare_share,
                "conv_share": args.conv_share,
                "check_share": args.check_share,
                "warmup": args.warmup,
                "duration": args.duration,
                "seed": seed + w,
            }
            for w in range(procs)
        ]
        prev: dict[str, float] = {}

        def progress_line(phase: str, t: float, latest: list[dict[str, Any]]) -> str:
            h = sum(d.get("history", 0) for d in latest)
            s = sum(d.get("search", 0) for d in latest)
            e = sum(d.get("errors", 0) for d in latest)
            dt = max(1e-9, t - prev.get("t", 0.0))
            rh, rs = (h - prev.get("h", 0)) / dt, (s - prev.get("s", 0)) / dt
            prev.update(t=t, h=h, s=s)
            timeline.append((t, rh, rs))
            return (
                f"bench {phase:7s} {t:5.1f}s  history {rh:7,.0f}/s  search {rs:6,.0f}/s  "
                f"errors {e:,d}"
            )

        print(
            f"bench: {C} HTTP clients ({args.client}) over {procs} process(es), "
            f"{args.warmup:g} s warmup + {args.duration:g} s",
            file=sys.stderr,
        )
        results, observed = common.run_workers(
            "bench.history",
            specs,
            warmup=args.warmup,
            duration=args.duration,
            setup_timeout=common.SETUP_TIMEOUT_S,
            progress_line=progress_line,
            server=server,
            progress=progress,
        )
    finally:
        server_exit, problems = common.stop_server(server)

    dur = args.duration
    count: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    samples = {k: common.new_samples() for k in KINDS}
    buckets: Counter[tuple[str, int]] = Counter()
    for r in results:
        count.update(r["count"])
        statuses.update(r["statuses"])
        for k, v in r["first_error"].items():
            first_error.setdefault(k, v)
        for k in KINDS:
            samples[k].frombytes(r["lat"][k])
        for key, v in r["buckets"].items():
            kind, b = key.split("|")
            buckets[("history" if kind == "history" else "search", int(b))] += v

    def tot(k: str) -> int:
        return sum(int(r[k]) for r in results)

    search_samples = common.new_samples()
    for k in KINDS[1:]:
        search_samples.extend(samples[k])
    n_hist = count["history"]
    n_search = sum(count[k] for k in KINDS[1:])
    reads = n_hist + n_search
    lat = {
        "history": common.latency_summary(samples["history"]),
        "search": common.latency_summary(search_samples),
        **{k: common.latency_summary(samples[k]) for k in KINDS[1:]},
    }
    cpu_per_proc = [round(r["cpu_pct"], 1) for r in results if r["cpu_pct"] is not None]
    gen_wait = [
        round(r["runqueue_wait_pct"], 1) for r in results if r["runqueue_wait_pct"] is not None
    ]
    saturated = bool(cpu_per_proc) and max(cpu_per_proc) > common.SATURATED_PCT
    if gen_cpus is not None and cpu_per_proc:
        own_total = sum(cpu_per_proc) + (observed.get("parent_cpu_pct") or 0.0)
        if own_total > common.SATURATED_PCT * len(common.parse_cpus(gen_cpus)):
            saturated = True
    busy = observed.get("cpu_busy_pct") or {}
    foreign_gen = foreign_srv = None
    if gen_cpus is not None and busy:
        gen_set = common.parse_cpus(gen_cpus)
        if server_cpus is None or not gen_set & common.parse_cpus(server_cpus):
            own = sum(cpu_per_proc) + (observed.get("parent_cpu_pct") or 0.0)
            foreign_gen = round(max(0.0, sum(busy.get(c, 0.0) for c in gen_set) - own), 1)
    if args.spawn_server and server_cpus is not None and busy and "server_cpu_pct" in observed:
        srv_set = common.parse_cpus(server_cpus)
        own = observed["server_cpu_pct"]
        foreign_srv = round(max(0.0, sum(busy.get(c, 0.0) for c in srv_set) - own), 1)
    contended = common.is_contended(foreign_gen, foreign_srv)
    srv_cpu = observed.get("server_cpu_pct")
    us_per_req = (
        round(srv_cpu / 100 * dur * 1e6 / reads, 1) if srv_cpu is not None and reads else None
    )
    gen_us_per_req = (
        round(sum(cpu_per_proc) / 100 * dur * 1e6 / reads, 1) if cpu_per_proc and reads else None
    )
    result: dict[str, Any] = {
        "bench": "history",
        **env,
        "client": args.client,
        "users": U,
        "partners": P,
        "conversations": len(prep["pairs"]),
        "messages_per_conv": M,
        "visible_msgs_per_user": round(sum(visible) / U),
        "clients": C,
        "procs": procs,
        "search_share": args.search_share,
        "rare_share": args.rare_share,
        "conv_share": args.conv_share,
        "history_limit": HISTORY_LIMIT,
        "search_limit": SEARCH_LIMIT,
        "duration_s": dur,
        "warmup_s": args.warmup,
        "loadgen_cpus": gen_cpus,
        "spawn_server": bool(args.spawn_server),
        "server_config": server.config.name if server is not None else None,
        "server_cpus": server_cpus if args.spawn_server else None,
        "register_s": prep["register_s"],
        "seeded": prep["seeded"],
        "seed_s": prep["seed_s"],
        "setup_s": observed.get("setup_s"),
        "reads_per_s": round(reads / dur, 1),
        "history_per_s": round(n_hist / dur, 1),
        "search_per_s": round(n_search / dur, 1),
        "search_kinds": {k: count[k] for k in KINDS[1:]},
        "latency_ms": lat,
        "errors": dict(statuses),
        "errors_total": tot("errors_total"),
        "first_error": first_error,
        "checked": tot("checked"),
        "bad_answers": tot("bad"),
        "search_results_checked": tot("found"),
        "unanswered_at_end": tot("unanswered"),
        "reconnects": tot("reconnects"),
        "loadgen_cpu_pct": cpu_per_proc,
        "loadgen_saturated": saturated,
        "loadgen_runqueue_wait_pct": gen_wait,
        "loadgen_cpu_us_per_req": gen_us_per_req,
        "server_cpu_pct": srv_cpu,
        "server_python_cpu_pct": observed.get("server_python_cpu_pct"),
        "server_postgres_cpu_pct": observed.get("server_postgres_cpu_pct"),
        "server_runqueue_wait_pct": observed.get("server_runqueue_wait_pct"),
        "server_cpu_us_per_req": us_per_req,
        **common.contention_fields(busy, foreign_gen, foreign_srv, contended),
        "server_exit_code": server_exit,
        "server_log_problems": len(problems),
    }

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}%"

    lines = [
        f"bench history: {C} HTTP clients ({args.client}, {procs} proc(s)), closed loop, "
        f"{U} users x {P} conversations x {M} messages, search share {args.search_share:g}, "
        f"{dur:g} s measured after {args.warmup:g} s warmup",
        f"  reads     {common.fmt_rate(reads / dur):>7} /s   (history {n_hist / dur:,.0f}/s, "
        f"search {n_search / dur:,.0f}/s)",
        f"  history   {common.fmt_lat(lat['history'])}",
        f"  search    {common.fmt_lat(lat['search'])}",
    ]
    for k in KINDS[1:]:
        lines.append(f"    {k[7:]:7s} {common.fmt_lat(lat[k])}")
    lines.append(
        "  errors: " + (", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) or "none")
    )
    lines.append(
        f"  checked {result['checked']:,} answers: {result['bad_answers']} bad; "
        f"{result['unanswered_at_end']} unanswered at the end, {result['reconnects']} reconnects"
    )
    gen = f"  load generator: {procs} proc(s)" + (f" on CPUs {gen_cpus}" if gen_cpus else "")
    gen += f", CPU {'/'.join(f'{c:.0f}%' for c in cpu_per_proc)} of a core"
    if gen_us_per_req is not None:
        gen += f" ({gen_us_per_req:.0f} us per read)"
    if srv_cpu is not None:
        gen += (
            f"; server (CPUs {server_cpus}): {srv_cpu:.0f}% (python "
            f"{observed.get('server_python_cpu_pct'):.0f}%, postgres "
            f"{observed.get('server_postgres_cpu_pct'):.0f}%), {us_per_req} us CPU per read"
        )
    lines.append(gen)
    lines.append(
        f"  other processes' CPU on the pinned CPUs: server CPUs {fmt(foreign_srv)}, "
        f"load generator CPUs {fmt(foreign_gen)}; load average "
        f"{env['loadavg_1m_before']} -> {result['loadavg_1m_after']}"
    )
    if contended:
        lines.append(
            "  WARNING: other processes competed for the pinned CPUs: rerun on a quiet machine"
        )
    if saturated:
        lines.append(
            "  WARNING: load generator saturated: reads/s is a lower bound, latencies include "
            "its backlog (add CPUs with --cpu and --procs)"
        )
    lines += common.first_error_lines(first_error)
    lines += common.server_warnings(problems, server_exit)
    common.emit(result, "\n".join(lines), args.json)
    if args.plot:
        from . import plot

        top = max((b for _, b in buckets), default=0)
        xs = [k * BUCKET_S for k in range(top + 1)]
        plot.write_run(
            args.json,
            "history",
            result,
            f"bench history: {C} HTTP clients, {reads / dur:,.0f} reads/s "
            f"(history {n_hist / dur:,.0f}/s, search {n_search / dur:,.0f}/s)\n",
            [
                (
                    "cdf",
                    "latency per kind (answers in the window)",
                    {
                        "history": [x / 1e6 for x in samples["history"]],
                        "search (all)": [x / 1e6 for x in search_samples],
                        **{k: [x / 1e6 for x in samples[k]] for k in KINDS[1:]},
                    },
                ),
                (
                    "series",
                    "answers per second (warmup included; 0.25 s buckets)",
                    "answers/s",
                    {
                        kind: (xs, [buckets.get((kind, k), 0) / BUCKET_S for k in range(top + 1)])
                        for kind in ("history", "search")
                    },
                ),
            ],
        )
    bad = result["bad_answers"] > 0 or reads == 0
    return 1 if bad else 0
