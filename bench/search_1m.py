"""Search over 1,000,000 messages: load cost with/without a trigram index, query times.

``python -m bench.search_1m [--dsn DSN] [--messages N] [--index none|trgm|both]
[--ctype C|C.UTF-8] [--runs R]``

Without ``--dsn`` it starts a scratch embedded PostgreSQL (``fsync=off``, like
the tests, in a temporary directory on /dev/shm when there is one) and removes
it at the end. With ``--dsn`` (a Unix socket or a loopback host only) it
creates and drops its own database ``imserver_search_bench`` there.

For each index mode it creates a fresh database (``LC_CTYPE`` from
``--ctype``: ``C`` is what the embedded cluster's ``initdb --locale=C`` gives),
applies migrations 0001 and 0002 (not 0003: the index under test is this
script's choice), optionally creates ``pg_trgm`` and a GIN trigram index on
``messages.body``, then loads the messages with the server's own statement
shape (``INSERT ... SELECT FROM unnest(...)``, one autocommit statement per
batch of 512), timing every batch. Then it runs representative searches
through :func:`imserver.storage.search.q_search` ``--runs`` times each
(p50/max wall time) and once under ``EXPLAIN (ANALYZE, BUFFERS)``.

In ``trgm`` mode it also times an index-friendly "global" statement (one
join, ``ORDER BY mid DESC``), the shape a trigram index could serve, to show
what the index would buy.

Data (deterministic, ``--seed``): ``viewer`` is in one very large group
(10% of all messages), 150 direct conversations and 30 groups (about 4% of
all messages together) and was removed from one group half-way; ~20,000
other conversations hold the rest. Bodies are half Chinese (2-character words,
full-width punctuation), half English words with random capitals. Planted
terms: ``你好`` (common 2-char), ``鲲鹏`` (rare 2-char), ``明天开会`` (common
4-char), ``量子纠缠`` (rare 4-char), ``meeting`` (common Latin), ``zyzzyva``
(rare Latin). 0.5% of messages are recalled, 1% are system entries, and the
viewer hid 300 messages.

Bounded: one load of 1M rows takes about a minute on one core (more with the
index); the whole run with ``--index both`` takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg

from imserver.storage.search import PLAN_SETTINGS, q_search, search_args, search_sql

DB = "imserver_search_bench"
VIEWER = "viewer"
BIG = "g:1"
BATCH = 512

_CJK_WORDS = (
    "大家 今天 我们 工作 时间 问题 已经 可以 没有 知道 什么 现在 这个 那个 因为 所以 但是 如果 "
    "还是 一起 东西 地方 朋友 公司 项目 会议 文件 报告 客户 电话 晚上 早上 下午 周末 吃饭 学习 "
    "老师 学生 学校 医院 城市 北京 上海 广州 深圳 天气 下雨 喜欢 觉得 希望 需要 开始 结束 准备 "
    "发送 收到 确认 修改 完成 检查 测试 上线 版本 代码 数据 服务 系统 用户 消息 图片 视频 链接 "
    "地址 价格 订单 快递 到了 出发 回家 休息 感谢 辛苦 麻烦 好的 收到了 明白 没问题 马上 等等 稍后 "
    "这样 怎么 为什么 哪里 多少 一下 一点 非常 特别 真的 "
)
CJK_WORDS = _CJK_WORDS.split()
_EN_WORDS = (
    "the a to and of in is it you that for on was with he be at one "
    "have this from by hot word but what some we can out other were all there when up "
    "use your how said an each she which do their time if will way about many then them "
    "write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think "
    "say help low line differ turn cause much mean before move right boy old too same tell does "
    "set three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father "
)
EN_WORDS = _EN_WORDS.split()
CJK_PUNCT = "，。！？、"

# (name, q, conv): conv None = all of the viewer's conversations.
QUERIES: list[tuple[str, str, str | None]] = [
    ("cjk2 common 你好", "你好", None),
    ("cjk2 rare 鲲鹏", "鲲鹏", None),
    ("cjk4 common 明天开会", "明天开会", None),
    ("cjk4 rare 量子纠缠", "量子纠缠", None),
    ("latin common meeting", "meeting", None),
    ("latin rare zyzzyva", "zyzzyva", None),
    ("no match 不存在的", "不存在的", None),
    ("cjk2 common, conv=big", "你好", BIG),
    ("cjk4 rare, conv=big", "量子纠缠", BIG),
    ("latin rare, conv=small", "zyzzyva", "d:u00007:viewer"),
    ("no match, conv=small", "不存在的", "d:u00007:viewer"),
]


# -- data ---------------------------------------------------------------------


def conversations(rng: random.Random, total: int) -> tuple[list[str], list[float], dict[str, str]]:
    """Conversation ids, their message weights and kinds."""
    convs: list[str] = [BIG]
    weights: list[float] = [0.10]
    kinds = {BIG: "group"}
    mine: list[str] = []
    for i in range(150):
        c = f"d:u{i:05d}:viewer"
        mine.append(c)
        kinds[c] = "direct"
    for i in range(2, 33):  # g:32 is the group the viewer left
        c = f"g:{i}"
        mine.append(c)
        kinds[c] = "group"
    raw = [rng.paretovariate(1.2) for _ in mine]
    for c, w in zip(mine, raw, strict=True):
        convs.append(c)
        weights.append(0.04 * w / sum(raw))
    others = 20_000
    raw = [rng.paretovariate(1.2) for _ in range(others)]
    s = sum(raw)
    for i, w in enumerate(raw):
        c = f"d:a{i:05d}:b{i:05d}" if i % 4 else f"g:{1000 + i}"
        convs.append(c)
        weights.append(0.86 * w / s)
        kinds[c] = "group" if c.startswith("g:") else "direct"
    return convs, weights, kinds


def body(rng: random.Random) -> str:
    """One message text: Chinese or English, with the planted terms at fixed rates."""
    x = rng.random()
    if rng.random() < 0.5:
        words = rng.choices(CJK_WORDS, k=rng.randint(2, 12))
        if x < 0.08:
            words.insert(rng.randrange(len(words) + 1), "你好")
        elif x < 0.10:
            words.insert(rng.randrange(len(words) + 1), "明天开会")
        elif x < 0.10004:
            words.insert(rng.randrange(len(words) + 1), "量子纠缠")
        elif x < 0.10008:
            words.insert(rng.randrange(len(words) + 1), "鲲鹏")
        out = []
        for w in words:
            out.append(w)
            if rng.random() < 0.25:
                out.append(rng.choice(CJK_PUNCT))
        return "".join(out)
    words = rng.choices(EN_WORDS, k=rng.randint(2, 14))
    if x < 0.05:
        words.insert(rng.randrange(len(words) + 1), rng.choice(("meeting", "Meeting", "MEETING")))
    elif x < 0.05004:
        words.insert(rng.randrange(len(words) + 1), "zyzzyva")
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice((".", "!", "?", ""))


def rows(
    seed: int, total: int
) -> tuple[list[tuple[Any, ...]], dict[str, int], dict[str, str], list[str]]:
    """The messages in commit order: (conv, seq, sender, kind, body, ts, recalled)."""
    rng = random.Random(seed)
    convs, weights, kinds = conversations(rng, total)
    picks = rng.choices(convs, weights, k=total)
    seqs: dict[str, int] = {}
    out: list[tuple[Any, ...]] = []
    ts0 = 1_760_000_000_000
    for i, c in enumerate(picks):
        s = seqs.get(c, 0) + 1
        seqs[c] = s
        if c.startswith("d:"):
            _, a, b = c.split(":")
            sender = a if rng.random() < 0.5 else b
        else:
            sender = VIEWER if rng.random() < 0.05 else f"m{rng.randrange(400):03d}"
        r = rng.random()
        if r < 0.01:
            out.append((c, s, sender, "system", f"{sender} joined", ts0 + i * 10, False))
        elif r < 0.015:
            out.append((c, s, sender, "text", None, ts0 + i * 10, True))
        else:
            out.append((c, s, sender, "text", body(rng), ts0 + i * 10, False))
    return out, seqs, kinds, convs


# -- database -----------------------------------------------------------------


def _check_local(dsn: str) -> None:
    """Refuse a DSN that is not a Unix socket or a loopback address."""
    u = urlparse(dsn)
    host = u.hostname or ""
    if "host=/" in (u.query or "") or host in ("", "localhost"):
        return
    for info in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing non-loopback database host {host!r}")


def _dsn_for(dsn: str, db: str) -> str:
    head, _, query = dsn.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{db}?{query}" if query else f"{base}/{db}"


@contextlib.contextmanager
def scratch_cluster() -> Iterator[str]:
    """A throw-away embedded PostgreSQL (fsync off); yields its DSN."""
    from imserver.storage.embedded import EmbeddedPostgres

    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="imserver-search-", dir=parent))
    cluster = EmbeddedPostgres(base / "pg", fsync=False)
    cluster.start()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def make_db(admin_dsn: str, ctype: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await conn.execute(
            f"CREATE DATABASE {DB} TEMPLATE template0 ENCODING 'UTF8' "
            f"LC_COLLATE 'C' LC_CTYPE '{ctype}'"
        )
    finally:
        await conn.close()


async def drop_db(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    finally:
        await conn.close()


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def load(
    conn: asyncpg.Connection,
    data: tuple[list[tuple[Any, ...]], dict[str, int], dict[str, str], list[str]],
    index: str,
    seed: int,
) -> dict[str, Any]:
    """Schema, optional index, the timed batch load, then the per-user rows."""
    msgs, seqs, kinds, _convs = data
    mig = resources.files("imserver.storage").joinpath("migrations")
    for name in ("0001_core.sql", "0002_groups.sql"):
        await conn.execute(mig.joinpath(name).read_text("utf-8"))
    if index == "trgm":
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        await conn.execute(
            "CREATE INDEX messages_body_trgm ON messages USING gin (body gin_trgm_ops)"
        )
    ins = (
        "INSERT INTO messages (conv, seq, sender, kind, body, ts, recalled) "
        "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], "
        "$5::text[], $6::bigint[], $7::boolean[])"
    )
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(0, len(msgs), BATCH):
        chunk = msgs[i : i + BATCH]
        cols = list(zip(*chunk, strict=True))
        t = time.perf_counter()
        await conn.execute(ins, *[list(c) for c in cols])
        lat.append((time.perf_counter() - t) * 1000)
    total_s = time.perf_counter() - t0
    # Conversations, memberships, hidden messages (not timed: not the hot path).
    await conn.execute(
        "INSERT INTO conversations (conv, kind, last_seq, last_ts) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])",
        list(seqs),
        [kinds[c] for c in seqs],
        list(seqs.values()),
        [0] * len(seqs),
    )
    rng = random.Random(seed + 1)
    uc_user: list[str] = []
    uc_conv: list[str] = []
    uc_left: list[int | None] = []
    for c in seqs:
        if c.startswith("d:"):
            _, a, b = c.split(":")
            members = [a, b]
        elif c == BIG:
            members = [VIEWER] + [f"m{k:03d}" for k in range(400)]
        else:
            members = [f"m{k:03d}" for k in rng.sample(range(400), 12)]
            if c in ("g:" + str(k) for k in range(2, 33)):
                members.append(VIEWER)
        for u in members:
            uc_user.append(u)
            uc_conv.append(c)
            uc_left.append(seqs[c] // 2 if (c == "g:32" and u == VIEWER) else None)
    await conn.execute(
        "INSERT INTO user_convs (user_name, conv, left_seq) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])",
        uc_user,
        uc_conv,
        uc_left,
    )
    await conn.execute(
        "INSERT INTO hidden_messages (user_name, mid) "
        "SELECT $1, mid FROM messages m JOIN user_convs uc ON uc.conv = m.conv "
        "AND uc.user_name = $1 WHERE m.body LIKE '%你好%' AND m.mid % 7 = 0 "
        "ORDER BY mid DESC LIMIT 300",
        VIEWER,
    )
    # Other users' deletions: 2% of all messages.
    await conn.execute(
        "INSERT INTO hidden_messages (user_name, mid) "
        "SELECT 'm' || lpad((mid % 400)::text, 3, '0'), mid FROM messages WHERE mid % 50 = 3"
    )
    t = time.perf_counter()
    await conn.execute("VACUUM ANALYZE")
    vacuum_s = time.perf_counter() - t
    sizes = await conn.fetchrow(
        "SELECT pg_relation_size('messages') AS heap, "
        "pg_indexes_size('messages') AS indexes, "
        "COALESCE(pg_relation_size(to_regclass('messages_body_trgm')), 0) AS trgm"
    )
    visible = await conn.fetchval(
        "SELECT count(*) FROM messages m JOIN user_convs uc ON uc.conv = m.conv "
        "AND uc.user_name = $1 WHERE m.seq <= COALESCE(uc.left_seq, m.seq)",
        VIEWER,
    )
    return {
        "rows": len(msgs),
        "load_s": round(total_s, 2),
        "rows_per_s": round(len(msgs) / total_s),
        "batch_ms_p50": round(pct(lat, 0.5), 2),
        "batch_ms_p99": round(pct(lat, 0.99), 2),
        "batch_ms_max": round(max(lat), 2),
        "vacuum_analyze_s": round(vacuum_s, 2),
        "heap_mb": round(sizes["heap"] / 2**20),
        "indexes_mb": round(sizes["indexes"] / 2**20),
        "trgm_mb": round(sizes["trgm"] / 2**20),
        "viewer_convs": sum(1 for u in uc_user if u == VIEWER),
        "viewer_visible_msgs": visible,
    }


#: Bound on one run of the "global" statement (a GIN scan over every body can
#: take minutes: a pattern without trigrams makes it read the whole index).
GLOBAL_TIMEOUT_MS = 10_000

GLOBAL_SQL = """
SELECT m.mid, m.conv, m.seq, m.sender, m.cid, m.kind, m.body, m.meta, m.mentions,
       m.reply_to, m.ts, m.recalled
FROM messages m JOIN user_convs uc ON uc.conv = m.conv AND uc.user_name = $1
WHERE m.seq <= COALESCE(uc.left_seq, 9223372036854775807) AND m.mid < $3
  AND m.body ILIKE $2 ESCAPE '\\' AND NOT m.recalled AND m.kind NOT IN ('system', 'recall')
  AND (SELECT h.mid FROM hidden_messages h WHERE h.user_name = $1 AND h.mid = m.mid) IS NULL
  AND ($5::text IS NULL OR uc.conv = $5::text)
ORDER BY m.mid DESC LIMIT $4
"""


def plan_summary(plan: list[str]) -> str:
    """The node names of an EXPLAIN text plan, outermost first, deduplicated."""
    nodes: list[str] = []
    for line in plan:
        s = line.strip().lstrip("->").strip()
        if "(actual" not in s and "(cost" not in s:
            continue
        name = s.split("  (")[0]
        if name not in nodes:
            nodes.append(name)
    return " / ".join(nodes)


async def _explain(conn: asyncpg.Connection, shape: str, sql: str, args: Any) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) under the settings the shape runs with."""
    async with conn.transaction(readonly=True):
        if shape == "lateral":
            await conn.execute(PLAN_SETTINGS)
        await conn.execute(f"SET LOCAL statement_timeout = {GLOBAL_TIMEOUT_MS}")
        return [r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)]


async def _global(conn: asyncpg.Connection, args: Any, limit: int) -> int:
    """The index-friendly statement, bounded by a statement timeout."""
    async with conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {GLOBAL_TIMEOUT_MS}")
        return len((await conn.fetch(GLOBAL_SQL, *args))[:limit])


async def time_queries(
    conn: asyncpg.Connection, runs: int, shapes: list[str], limit: int, plans: bool
) -> list[dict[str, Any]]:
    """Each query: one untimed warm-up, ``runs`` timed runs, one EXPLAIN ANALYZE."""
    out = []
    for name, q, conv in QUERIES:
        for shape in shapes:
            sql = search_sql(q) if shape == "lateral" else GLOBAL_SQL
            args = search_args(VIEWER, q, conv, limit, None)
            ms: list[float] = []
            n = 0
            timed_out = False
            for i in range(runs + 1):
                t = time.perf_counter()
                try:
                    if shape == "lateral":
                        found, _more = await q_search(conn, VIEWER, q, conv, limit)
                        n = len(found)
                    else:
                        n = await _global(conn, args, limit)
                except asyncpg.QueryCanceledError:
                    timed_out = True
                    break
                if i > 0:
                    ms.append((time.perf_counter() - t) * 1000)
            if timed_out:
                row = {"query": name, "shape": shape, "timeout_ms": GLOBAL_TIMEOUT_MS}
                out.append(row)
                print(
                    f"  {name:28s} {shape:7s} over the {GLOBAL_TIMEOUT_MS} ms timeout", flush=True
                )
                continue
            plan = await _explain(conn, shape, sql, args)
            exec_ms = next(
                (float(p.split(":")[1].split()[0]) for p in plan if p.startswith("Execution Time")),
                float("nan"),
            )
            if plans:
                print("\n".join("      " + p for p in plan), flush=True)
            row = {
                "query": name,
                "shape": shape,
                "found": n,
                "p50_ms": round(statistics.median(ms), 2),
                "max_ms": round(max(ms), 2),
                "explain_exec_ms": round(exec_ms, 2),
                "plan": plan_summary(plan),
            }
            out.append(row)
            print(
                f"  {name:28s} {shape:7s} found={n:3d} p50={row['p50_ms']:8.2f} ms "
                f"max={row['max_ms']:8.2f} ms explain={exec_ms:8.2f} ms  {row['plan'][:90]}",
                flush=True,
            )
    return out


async def run_mode(
    admin_dsn: str, index: str, ctype: str, data: Any, args: argparse.Namespace
) -> dict[str, Any]:
    await make_db(admin_dsn, ctype)
    conn = await asyncpg.connect(_dsn_for(admin_dsn, DB))
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        print(f"[{index}, LC_CTYPE={ctype}] loading {len(data[0]):,} messages ...", flush=True)
        stats = await load(conn, data, index, args.seed)
        print("  " + json.dumps(stats, ensure_ascii=False), flush=True)
        shapes = ["lateral"] + (["global"] if index == "trgm" else [])
        queries = await time_queries(conn, args.runs, shapes, args.limit, args.plans)
        trgm = None
        if index == "trgm":
            trgm = await conn.fetchval("SELECT show_trgm('大家好，你好吗')::text")
    finally:
        await conn.close()
    if not args.keep:
        await drop_db(admin_dsn)
    return {"index": index, "ctype": ctype, "load": stats, "queries": queries, "show_trgm": trgm}


def environment() -> dict[str, str]:
    def sh(cmd: str) -> str:
        return subprocess.run(
            cmd, shell=True, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo").split(":", 1)[-1].strip(),
        "commit": sh("git rev-parse --short HEAD"),
        "uptime": sh("uptime"),
    }


async def main_async(args: argparse.Namespace, admin_dsn: str) -> dict[str, Any]:
    t = time.perf_counter()
    data = rows(args.seed, args.messages)
    print(f"generated {args.messages:,} messages in {time.perf_counter() - t:.1f} s", flush=True)
    modes = ["none", "trgm"] if args.index == "both" else [args.index]
    results = [await run_mode(admin_dsn, m, args.ctype, data, args) for m in modes]
    return {"env": environment(), "messages": args.messages, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.search_1m", description=__doc__.split("\n")[0]
    )
    p.add_argument("--dsn", help="an existing local PostgreSQL (superuser); default: scratch one")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--index", choices=("none", "trgm", "both"), default="both")
    p.add_argument("--ctype", default="C", help="LC_CTYPE of the scratch database (C, C.UTF-8)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per query")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="append the result as one JSON line to this file")
    p.add_argument("--plans", action="store_true", help="print every EXPLAIN ANALYZE plan")
    p.add_argument("--keep", action="store_true", help="keep the database (with --dsn)")
    args = p.parse_args(argv)
    if not 1 <= args.messages <= 5_000_000 or not 1 <= args.runs <= 50:
        p.error("--messages must be 1..5,000,000 and --runs 1..50")
    if args.ctype not in ("C", "C.UTF-8", "C.utf8", "POSIX"):
        p.error("--ctype must be C, C.UTF-8 or POSIX")
    if args.dsn:
        _check_local(args.dsn)
        result = asyncio.run(main_async(args, args.dsn))
    else:
        with scratch_cluster() as dsn:
            result = asyncio.run(main_async(args, dsn))
    line = json.dumps(result, ensure_ascii=False)
    print(line)
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
