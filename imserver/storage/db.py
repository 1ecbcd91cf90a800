"""PostgreSQL access: every query of the server, each hop a whole unit of work.

All SQL lives in this package (STYLE practice 11). Public ``async`` methods are
Trio-facing: each one crosses the bridge once and runs its queries, with their
transaction, on the asyncio thread (the ``_q_*`` functions). asyncpg errors are
translated into :mod:`imserver.storage.errors` here and nowhere else.

Per-conversation ``seq`` allocation (``_SeqCache``) lives on the asyncio side and
is touched only by the batch commit, which runs one batch at a time: the cache
is loaded from ``conversations.last_seq`` on first use and advanced only after
the transaction commits; any failure forgets it, so the next batch reloads from
PostgreSQL. So ``seq`` has no gap and no repeat, across failures and restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import json.encoder
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar

import asyncpg
import trio

from .bridge import AsyncioThread
from .errors import StorageConflict, StorageError, StorageUnavailable
from .records import BatchResult, CursorUpdate, GroupEffect, RecallEffect, Relations, SendRow

log = logging.getLogger("imserver.storage")
T = TypeVar("T")

_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)

MSG_COLUMNS = "mid, conv, seq, sender, cid, kind, body, meta, mentions, reply_to, ts, recalled"


def msg_to_frame(r: Any, viewer: str | None = None) -> dict[str, Any]:
    """A ``messages`` row as the protocol's message map (``cid`` for the sender only)."""
    m: dict[str, Any] = {
        "mid": r["mid"],
        "conv": r["conv"],
        "seq": r["seq"],
        "from": r["sender"],
        "kind": r["kind"],
        "ts": r["ts"],
    }
    if r["recalled"]:
        m["recalled"] = True
    else:
        m["body"] = r["body"] if r["body"] is not None else ""
        if r["meta"] is not None:
            m["meta"] = r["meta"]
    if r["mentions"] is not None:
        m["mentions"] = r["mentions"]
    if r["reply_to"] is not None:
        m["reply_to"] = r["reply_to"]
    if viewer is not None and r["cid"] is not None and r["sender"] == viewer:
        m["cid"] = r["cid"]
    return m


def _unusable(conn: asyncpg.Connection) -> bool:
    """Whether a held pool connection was closed or taken back by the pool."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def _now_ms() -> int:
    return int(time.time() * 1000)


class _SeqCache:
    """conv -> last committed seq. Only the batch commit touches it."""

    def __init__(self, max_entries: int = 500_000) -> None:
        self.last: dict[str, int] = {}
        self.max_entries = max_entries

    def forget(self) -> None:
        self.last.clear()


class Storage:
    """Trio-facing PostgreSQL storage: a pool on the asyncio thread."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 8,
        connect_timeout: float = 5.0,
        query_timeout: float = 10.0,
        writer_id: int = 0,
    ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self.writer_id = writer_id
        self.incarnation = _now_ms()
        self._batch_no = 0
        self._thread = AsyncioThread()
        self._pool: asyncpg.Pool | None = None
        self._seq = _SeqCache()
        self._writer_conn: asyncpg.Connection | None = None
        self.up = False

    def __repr__(self) -> str:
        return f"<Storage writer={self.writer_id} up={self.up}>"

    # -- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Start the asyncio thread and connect the pool.

        Raises:
            StorageUnavailable: PostgreSQL cannot be reached.
        """
        self._thread.start()
        await self._call(self._q_open)
        self.up = True

    async def aclose(self) -> None:
        """Close the pool and stop the asyncio thread."""
        try:
            # Shielded, and bounded on the asyncio side by the real clock (a
            # Trio deadline would fire at once under an autojump MockClock).
            with trio.CancelScope(shield=True):
                await self._thread.call(self._q_close)
        finally:
            self._thread.stop()

    async def _q_open(self) -> None:
        async def init(conn: asyncpg.Connection) -> None:
            await conn.set_type_codec(
                "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )

        async def no_reset(conn: asyncpg.Connection) -> None:
            # The server keeps no session state (no SET, LISTEN, cursors or
            # session advisory locks), so skip asyncpg's reset round trip.
            return None

        self._pool = await asyncpg.create_pool(
            self.dsn,
            reset=no_reset,
            min_size=1,
            max_size=self.pool_size,
            timeout=self.connect_timeout,
            command_timeout=self.query_timeout,
            init=init,
        )

    async def _q_close(self) -> None:
        if self._pool is not None:
            if self._writer_conn is not None:
                with contextlib.suppress(asyncpg.InterfaceError):
                    await self._pool.release(self._writer_conn)
                self._writer_conn = None
            try:
                await asyncio.wait_for(self._pool.close(), 10.0)
            except TimeoutError:
                self._pool.terminate()

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Cross the bridge once, translating driver errors (practice 11)."""
        try:
            result = await self._thread.call(fn, *args)
        except _UNAVAILABLE_ERRORS as e:
            self.up = False
            raise StorageUnavailable(f"storage unavailable: {type(e).__name__}: {e}") from None
        except asyncpg.UniqueViolationError as e:
            raise StorageConflict(str(e)) from None
        except asyncpg.PostgresError as e:
            raise StorageError(f"{type(e).__name__}: {e}") from None
        self.up = True
        return result

    async def _acquire_run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._call(self._with_conn, fn, *args)

    async def _with_conn(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        assert self._pool is not None
        async with self._pool.acquire(timeout=self.connect_timeout) as conn:
            return await fn(conn, *args)

    # -- migrations ----------------------------------------------------------

    async def migrate(self) -> list[str]:
        """Apply pending migrations (``storage/migrations/NNNN_name.sql``); return their names."""
        files = sorted(
            (p.name, p.read_text("utf-8"))
            for p in resources.files("imserver.storage").joinpath("migrations").iterdir()
            if p.name.endswith(".sql")
        )
        return await self._acquire_run(_q_migrate, files)

    async def ping(self) -> None:
        """Check that PostgreSQL answers."""
        await self._acquire_run(_q_ping)

    # -- accounts ------------------------------------------------------------

    async def create_user(self, name: str, pw_hash: str) -> bool:
        """Create a user; False if the name is taken."""
        return await self._acquire_run(_q_create_user, name, pw_hash, _now_ms())

    async def user_exists(self, name: str) -> bool:
        """Whether ``name`` is a registered user."""
        return await self._acquire_run(_q_user_exists, name)

    async def password_hash(self, name: str) -> str | None:
        """The stored argon2 hash of ``name``, or None if no such user."""
        return await self._acquire_run(_q_pw_hash, name)

    async def set_password_hash(self, name: str, pw_hash: str) -> None:
        """Replace the stored hash (rehash after parameter changes)."""
        await self._acquire_run(_q_set_pw_hash, name, pw_hash)

    async def insert_token(
        self, token_hash: bytes, user: str, device: str, created_ms: int, expires_ms: int
    ) -> None:
        """Store a token's hash."""
        await self._acquire_run(_q_insert_token, token_hash, user, device, created_ms, expires_ms)

    async def token_owner(self, token_hash: bytes) -> tuple[str, int, bool] | None:
        """(user, expires_ms, revoked) of a token hash, or None."""
        return await self._acquire_run(_q_token_owner, token_hash)

    async def token_owners(self, hashes: list[bytes]) -> dict[bytes, tuple[str, int, bool]]:
        """hash -> (user, expires_ms, revoked) of the known ones among ``hashes``."""
        return await self._acquire_run(_q_token_owners, hashes)

    async def revoke_token(self, token_hash: bytes) -> None:
        """Mark a token revoked."""
        await self._acquire_run(_q_revoke_token, token_hash)

    # -- friends -------------------------------------------------------------

    async def relations(self, user: str) -> Relations:
        """Friends and blocks of ``user``."""
        return await self._acquire_run(_q_relations, user)

    async def friend_op(self, op: str, user: str, other: str, note: str = "") -> str:
        """Run one friend operation in a transaction; returns an outcome word.

        Outcomes: ``requested``, ``accepted``, ``rejected``, ``removed``,
        ``blocked``, ``unblocked``, or an error code word: ``not_found``,
        ``conflict``, ``forbidden``, ``invalid``.
        """
        return await self._acquire_run(_q_friend_op, op, user, other, note, _now_ms())

    async def friend_requests(self, user: str) -> list[dict[str, Any]]:
        """Pending requests to and from ``user``."""
        return await self._acquire_run(_q_friend_requests, user)

    # -- reading -------------------------------------------------------------

    async def find_sent(self, sender: str, cid: str) -> dict[str, Any] | None:
        """The ``mid``/``conv``/``seq``/``ts`` of ``sender``'s message ``cid``, if stored."""
        return await self._acquire_run(_q_find_sent, sender, cid)

    async def sync(self, user: str, max_convs: int, unread_cap: int) -> list[dict[str, Any]]:
        """The user's conversations, pinned first, then most recent first."""
        return await self._acquire_run(_q_sync, user, max_convs, unread_cap)

    async def history(
        self,
        viewer: str,
        conv: str,
        after: int | None,
        before: int | None,
        limit: int,
        *,
        member_only: bool = False,
    ) -> tuple[list[dict[str, Any]], bool] | None:
        """Messages of ``conv`` in ascending seq, and whether more exist that way.

        Messages ``viewer`` deleted are left out. With ``member_only`` (group
        conversations) the viewer must have a row for ``conv``: None if not,
        and a former member sees nothing past the entry that removed them.
        """
        return await self._acquire_run(_q_history, viewer, conv, after, before, limit, member_only)

    async def existing_users(self, names: list[str]) -> set[str]:
        """Those of ``names`` that are registered users."""
        return await self._acquire_run(_q_existing_users, names)

    async def search(
        self, viewer: str, q: str, conv: str | None, limit: int, before_mid: int | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Messages of ``viewer``'s conversations containing ``q``, newest first,
        and whether more match (see :func:`imserver.storage.search.q_search`)."""
        from .search import q_search

        return await self._acquire_run(q_search, viewer, q, conv, limit, before_mid)

    async def poll_since(
        self, viewer: str, after_mid: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Entries of ``viewer``'s conversations committed after ``after_mid``.

        In commit order (``mid``: one writer commits one batch at a time), at
        most ``limit``, with the highest ``mid`` to continue from. With
        ``after_mid`` None: no entries and the current highest ``mid``.
        """
        return await self._acquire_run(_q_poll_since, viewer, after_mid, limit)

    async def store_wechat_event(
        self, appid: str, new_msg_id: int, sender: str, raw: dict[str, Any], now_ms: int
    ) -> str:
        """Keep a WeChat event as received, once per (appid, new_msg_id).

        Returns the sender stored with its first delivery: a replay's message
        is keyed by that (with the cid) whatever the replay says.
        """
        return await self._acquire_run(
            _q_store_wechat_event, appid, new_msg_id, sender, raw, now_ms
        )

    async def reconcile_wechat_owners(self, owners: dict[str, tuple[str, ...]]) -> tuple[int, int]:
        """Make the WeChat conversations' members exactly the configured owners.

        Removes ``user_convs`` rows of users who no longer own the account (and
        of accounts no longer configured), adds rows for current owners; returns
        (removed, added).
        """
        pairs = [(appid, o) for appid, os in owners.items() for o in os]
        return await self._acquire_run(
            _q_reconcile_wechat_owners, [a for a, _ in pairs], [o for _, o in pairs]
        )

    # -- groups and message state ---------------------------------------------

    async def next_gid(self) -> str:
        """A new, never used group id."""
        return await self._acquire_run(_q_next_gid)

    async def load_group(
        self, gid: str
    ) -> tuple[dict[str, Any], list[tuple[str, str, int]]] | None:
        """A group's row and its members as (user, role, joined_seq), or None."""
        return await self._acquire_run(_q_load_group, gid)

    async def groups_of(self, user: str) -> list[dict[str, Any]]:
        """The groups ``user`` is a member of, with their role and member count."""
        return await self._acquire_run(_q_groups_of, user)

    async def message_states(self, mids: list[int]) -> dict[int, dict[str, Any]]:
        """mid -> conv, seq, sender, kind, ts, recalled of the stored ones among ``mids``."""
        return await self._acquire_run(_q_message_states, mids)

    async def hide_message(self, user: str, mid: int) -> dict[str, Any] | None:
        """Hide ``mid`` for ``user`` (idempotent); its conv and seq, or None if
        no such message is visible to the user."""
        return await self._acquire_run(_q_hide_message, user, mid)

    async def conv_set(
        self, user: str, conv: str, pinned: bool | None, muted: bool | None
    ) -> dict[str, Any] | None:
        """Set pinned/muted of ``user``'s conversation; the new values, or None
        if the user has no such conversation."""
        return await self._acquire_run(_q_conv_set, user, conv, pinned, muted)

    # -- notices -------------------------------------------------------------

    async def create_notice(
        self, kind: str, title: str, body: str, users: list[str] | None, now_ms: int
    ) -> int | list[str]:
        """Store a notice for ``users`` (None: every user); its id, or the
        unknown users among ``users`` (then nothing is stored)."""
        return await self._acquire_run(_q_create_notice, kind, title, body, users, now_ms)

    async def unread_notices(self, user: str, limit: int) -> list[dict[str, Any]]:
        """Notices of ``user`` not read yet, newest first."""
        return await self._acquire_run(_q_unread_notices, user, limit)

    async def read_notice(self, user: str, notice_id: int, now_ms: int) -> bool:
        """Mark a notice read (idempotent); False if ``user`` has no such notice."""
        return await self._acquire_run(_q_read_notice, user, notice_id, now_ms)

    # -- the batch commit ----------------------------------------------------

    async def commit_batch(
        self,
        rows: list[SendRow],
        cursors: list[CursorUpdate],
        now_ms: int | None = None,
        timeout: float = 5.0,
    ) -> BatchResult:
        """Commit one batch in one transaction and return it with mids and seqs.

        Repeats of an already stored ``(sender, cid)`` are not inserted; they
        come back with ``repeat=True`` and the original's mid, conv, seq and ts.

        Raises:
            StorageUnavailable: the batch did not commit (its seqs are given back).
        """
        try:
            ts = _now_ms() if now_ms is None else now_ms
            await self._call(self._q_commit_batch_within, rows, cursors, ts, timeout)
        except StorageUnavailable:
            raise
        except Exception as e:
            # Whatever went wrong, the batch did not commit (seqs were given
            # back): fail it as a whole rather than let the writer die.
            log.exception("commit_failed rows=%d cursors=%d", len(rows), len(cursors))
            raise StorageUnavailable(f"commit failed: {type(e).__name__}") from None
        self._batch_no += 1
        return BatchResult(self.writer_id, self.incarnation, self._batch_no, rows, cursors)

    async def _q_commit_batch_within(
        self, rows: list[SendRow], cursors: list[CursorUpdate], ts: int, timeout: float
    ) -> None:
        # The deadline runs on the asyncio side, on the real clock.
        async with asyncio.timeout(timeout):
            await self._q_commit_batch(rows, cursors, ts)

    async def _q_commit_batch(
        self, rows: list[SendRow], cursors: list[CursorUpdate], ts: int
    ) -> None:
        assert self._pool is not None
        seqcache = self._seq
        # The writer keeps one connection for itself: a pool acquire/release
        # per batch measured ~0.8 ms here, as much as a small batch's insert.
        conn = self._writer_conn
        if conn is not None and _unusable(conn):
            self._writer_conn = conn = None
        if conn is None:
            conn = self._writer_conn = await self._pool.acquire(timeout=self.connect_timeout)
        try:
            if cursors or any(r.effect is not None or r.mentions for r in rows):
                async with conn.transaction():
                    new_last = await _q_insert_rows(conn, rows, seqcache.last, ts)
                    await _q_apply_effects(conn, rows)
                    await _q_apply_cursors(conn, cursors)
            else:
                # One autocommit statement in the common case (see _INSERT_BATCH).
                new_last = await _q_insert_rows(conn, rows, seqcache.last, ts)
        except BaseException:
            # Unknown outcome or rollback: give every number back (reload
            # later), and do not trust the connection again.
            seqcache.forget()
            self._writer_conn = None
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
                await self._pool.release(conn)
            raise
        if len(seqcache.last) > seqcache.max_entries:
            seqcache.forget()
        seqcache.last.update(new_last)


# ---------------------------------------------------------------------------
# Queries (asyncio side). Each takes a connection; none leaks driver types.
# ---------------------------------------------------------------------------


async def _q_ping(conn: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT 1")


async def _q_migrate(conn: asyncpg.Connection, files: list[tuple[str, str]]) -> list[str]:
    applied: list[str] = []
    async with conn.transaction():
        # Serialise concurrent migrators (two servers starting on one database).
        await conn.execute("SELECT pg_advisory_xact_lock(7700770077)")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(name text PRIMARY KEY, applied_ms bigint NOT NULL)"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, sql in files:
            if name in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (name, applied_ms) VALUES ($1, $2)",
                name,
                _now_ms(),
            )
            applied.append(name)
    return applied


async def _q_create_user(conn: asyncpg.Connection, name: str, pw_hash: str, now: int) -> bool:
    r = await conn.fetchval(
        "INSERT INTO users (name, pw_hash, created_ms) VALUES ($1, $2, $3) "
        "ON CONFLICT (name) DO NOTHING RETURNING 1",
        name,
        pw_hash,
        now,
    )
    return r is not None


async def _q_user_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE name = $1)", name))


async def _q_pw_hash(conn: asyncpg.Connection, name: str) -> str | None:
    r: str | None = await conn.fetchval("SELECT pw_hash FROM users WHERE name = $1", name)
    return r


async def _q_set_pw_hash(conn: asyncpg.Connection, name: str, pw_hash: str) -> None:
    await conn.execute("UPDATE users SET pw_hash = $2 WHERE name = $1", name, pw_hash)


async def _q_insert_token(
    conn: asyncpg.Connection, h: bytes, user: str, device: str, created: int, expires: int
) -> None:
    await conn.execute(
        "INSERT INTO tokens (hash, user_name, device, created_ms, expires_ms) "
        "VALUES ($1, $2, $3, $4, $5)",
        h,
        user,
        device,
        created,
        expires,
    )


async def _q_token_owner(conn: asyncpg.Connection, h: bytes) -> tuple[str, int, bool] | None:
    r = await conn.fetchrow("SELECT user_name, expires_ms, revoked FROM tokens WHERE hash = $1", h)
    return None if r is None else (r["user_name"], r["expires_ms"], r["revoked"])


async def _q_token_owners(
    conn: asyncpg.Connection, hashes: list[bytes]
) -> dict[bytes, tuple[str, int, bool]]:
    rows = await conn.fetch(
        "SELECT hash, user_name, expires_ms, revoked FROM tokens WHERE hash = ANY($1::bytea[])",
        hashes,
    )
    return {r["hash"]: (r["user_name"], r["expires_ms"], r["revoked"]) for r in rows}


async def _q_revoke_token(conn: asyncpg.Connection, h: bytes) -> None:
    await conn.execute("UPDATE tokens SET revoked = true WHERE hash = $1", h)


async def _q_relations(conn: asyncpg.Connection, user: str) -> Relations:
    friends = await conn.fetch(
        "SELECT b AS peer FROM friendships WHERE a = $1 UNION ALL "
        "SELECT a FROM friendships WHERE b = $1",
        user,
    )
    blocking = await conn.fetch("SELECT blocked FROM blocks WHERE blocker = $1", user)
    blocked_by = await conn.fetch("SELECT blocker FROM blocks WHERE blocked = $1", user)
    return Relations({r[0] for r in friends}, {r[0] for r in blocking}, {r[0] for r in blocked_by})


async def _q_friend_op(
    conn: asyncpg.Connection, op: str, user: str, other: str, note: str, now: int
) -> str:
    if user == other:
        return "invalid"
    a, b = (user, other) if user < other else (other, user)
    async with conn.transaction():
        exists = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE name = $1)", other)
        if not exists:
            return "not_found"
        is_friend = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM friendships WHERE a = $1 AND b = $2)", a, b
        )
        blocked = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM blocks WHERE (blocker = $1 AND blocked = $2) "
            "OR (blocker = $2 AND blocked = $1))",
            user,
            other,
        )
        if op == "friend_request":
            if blocked:
                return "forbidden"
            if is_friend:
                return "conflict"
            reverse = await conn.fetchval(
                "DELETE FROM friend_requests WHERE from_user = $1 AND to_user = $2 RETURNING 1",
                other,
                user,
            )
            if reverse:
                await conn.execute(
                    "INSERT INTO friendships (a, b, since_ms) VALUES ($1, $2, $3)", a, b, now
                )
                return "accepted"
            await conn.execute(
                "INSERT INTO friend_requests (from_user, to_user, note, created_ms) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (from_user, to_user) "
                "DO UPDATE SET note = EXCLUDED.note, created_ms = EXCLUDED.created_ms",
                user,
                other,
                note,
                now,
            )
            return "requested"
        if op in ("friend_accept", "friend_reject"):
            found = await conn.fetchval(
                "DELETE FROM friend_requests WHERE from_user = $1 AND to_user = $2 RETURNING 1",
                other,
                user,
            )
            if not found:
                return "not_found"
            if op == "friend_reject":
                return "rejected"
            if blocked:
                return "forbidden"
            await conn.execute(
                "DELETE FROM friend_requests WHERE from_user = $1 AND to_user = $2", user, other
            )
            await conn.execute(
                "INSERT INTO friendships (a, b, since_ms) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                a,
                b,
                now,
            )
            return "accepted"
        if op == "friend_remove":
            removed = await conn.fetchval(
                "DELETE FROM friendships WHERE a = $1 AND b = $2 RETURNING 1", a, b
            )
            return "removed" if removed else "not_found"
        if op == "block":
            await conn.execute(
                "INSERT INTO blocks (blocker, blocked, created_ms) VALUES ($1, $2, $3) "
                "ON CONFLICT DO NOTHING",
                user,
                other,
                now,
            )
            return "blocked"
        if op == "unblock":
            await conn.execute(
                "DELETE FROM blocks WHERE blocker = $1 AND blocked = $2", user, other
            )
            return "unblocked"
    raise ValueError(f"unknown friend op {op!r}")


async def _q_find_sent(conn: asyncpg.Connection, sender: str, cid: str) -> dict[str, Any] | None:
    r = await conn.fetchrow(
        "SELECT mid, conv, seq, ts FROM messages WHERE sender = $1 AND cid = $2", sender, cid
    )
    return None if r is None else dict(r)


async def _q_friend_requests(conn: asyncpg.Connection, user: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT from_user, to_user, note, created_ms FROM friend_requests "
        "WHERE from_user = $1 OR to_user = $1 ORDER BY created_ms",
        user,
    )
    out = []
    for r in rows:
        incoming = r["to_user"] == user
        out.append(
            {
                "user": r["from_user"] if incoming else r["to_user"],
                "direction": "in" if incoming else "out",
                "note": r["note"],
                "ts": r["created_ms"],
            }
        )
    return out


_NOT_HIDDEN = (
    "NOT EXISTS (SELECT 1 FROM hidden_messages h WHERE h.user_name = $1 AND h.mid = {m}.mid)"
)


async def _q_sync(
    conn: asyncpg.Connection, user: str, max_convs: int, unread_cap: int
) -> list[dict[str, Any]]:
    # cap: a former group member sees nothing past the entry that removed them.
    rows = await conn.fetch(
        f"""
        SELECT s.*,
               (SELECT count(*) FROM (
                    SELECT 1 FROM messages x
                    WHERE x.conv = s.conv_id AND x.seq > s.read_seq AND x.seq <= s.cap
                      AND x.sender <> $1 AND x.kind NOT IN ('system', 'recall')
                      AND NOT x.recalled AND {_NOT_HIDDEN.format(m="x")}
                    LIMIT $3) u) AS unread,
               {", ".join("m." + c for c in MSG_COLUMNS.split(", "))}
        FROM (
            SELECT uc.conv AS conv_id, c.kind AS conv_kind,
                   LEAST(c.last_seq, COALESCE(uc.left_seq, c.last_seq)) AS cap,
                   uc.read_seq, uc.pinned, uc.muted, uc.mention_seq, uc.left_seq,
                   c.last_ts, g.name AS group_name
            FROM user_convs uc
            JOIN conversations c ON c.conv = uc.conv
            LEFT JOIN groups g ON c.kind = 'group' AND g.gid = substr(uc.conv, 3)
            WHERE uc.user_name = $1 AND c.last_seq > 0
            ORDER BY uc.pinned DESC, c.last_ts DESC, uc.conv
            LIMIT $2
        ) s
        LEFT JOIN LATERAL (
            SELECT * FROM messages y
            WHERE y.conv = s.conv_id AND y.seq <= s.cap AND {_NOT_HIDDEN.format(m="y")}
            ORDER BY y.seq DESC LIMIT 1
        ) m ON true
        ORDER BY s.pinned DESC, s.last_ts DESC, s.conv_id
        """,
        user,
        max_convs,
        unread_cap,
    )
    out = []
    for r in rows:
        conv = r["conv_id"]
        kind = r["conv_kind"]
        entry: dict[str, Any] = {
            "conv": conv,
            "kind": kind,
            "title": r["group_name"] if kind == "group" else conv_title(conv, kind, user),
            "last_seq": r["cap"],
            "last_msg": msg_to_frame(r, user) if r["mid"] is not None else None,
            "read_seq": r["read_seq"],
            "unread": r["unread"],
            "pinned": r["pinned"],
            "muted": r["muted"],
        }
        if kind == "group":
            entry["mentioned"] = r["mention_seq"] > r["read_seq"]
            if r["left_seq"] is not None:
                entry["left"] = True
        out.append(entry)
    return out


def conv_title(conv: str, kind: str, viewer: str) -> str:
    """The sync title: the peer (direct), else the id's last part."""
    if kind == "direct":
        _, a, b = conv.split(":", 2)
        return b if a == viewer else a
    if kind == "wechat":
        return conv.split(":", 2)[-1]  # wx:<appid>:<peer>; the appid has no ':'
    return conv.rsplit(":", 1)[-1]


async def _q_history(
    conn: asyncpg.Connection,
    viewer: str,
    conv: str,
    after: int | None,
    before: int | None,
    limit: int,
    member_only: bool,
) -> tuple[list[dict[str, Any]], bool] | None:
    cap = 2**62
    if member_only:
        row = await conn.fetchrow(
            "SELECT left_seq FROM user_convs WHERE user_name = $1 AND conv = $2", viewer, conv
        )
        if row is None:
            return None
        if row["left_seq"] is not None:
            cap = row["left_seq"]
    visible = f"conv = $2 AND seq <= $5 AND {_NOT_HIDDEN.format(m='messages')}"
    if after is not None:
        rows = await conn.fetch(
            f"SELECT {MSG_COLUMNS} FROM messages WHERE {visible} AND seq > $3 "
            "ORDER BY seq LIMIT $4",
            viewer,
            conv,
            after,
            limit + 1,
            cap,
        )
        more = len(rows) > limit
        rows = rows[:limit]
    else:
        bound = before if before is not None else 2**62
        rows = await conn.fetch(
            f"SELECT {MSG_COLUMNS} FROM messages WHERE {visible} AND seq < $3 "
            "ORDER BY seq DESC LIMIT $4",
            viewer,
            conv,
            bound,
            limit + 1,
            cap,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        rows.reverse()
    return [msg_to_frame(r, viewer) for r in rows], more


async def _q_poll_since(
    conn: asyncpg.Connection, viewer: str, after_mid: int | None, limit: int
) -> tuple[list[dict[str, Any]], int]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        top: int = await conn.fetchval("SELECT COALESCE(max(mid), 0) FROM messages")
        if after_mid is None or after_mid >= top:
            return [], top
        # Walks the mid index from the cursor (commit order: one writer
        # commits one batch at a time), so the cost is the traffic since the
        # cursor, which moves to `top` when nothing of the viewer's is there.
        rows = await conn.fetch(
            f"""
            SELECT {", ".join("m." + c for c in MSG_COLUMNS.split(", "))}
            FROM messages m
            JOIN user_convs uc ON uc.conv = m.conv AND uc.user_name = $1
            WHERE m.mid > $2 AND m.mid <= $4 AND m.seq <= COALESCE(uc.left_seq, m.seq)
              AND {_NOT_HIDDEN.format(m="m")}
            ORDER BY m.mid
            LIMIT $3
            """,
            viewer,
            after_mid,
            limit,
            top,
        )
    last = rows[-1]["mid"] if len(rows) == limit else top
    return [msg_to_frame(r, viewer) for r in rows], last


async def _q_store_wechat_event(
    conn: asyncpg.Connection,
    appid: str,
    new_msg_id: int,
    sender: str,
    raw: dict[str, Any],
    now: int,
) -> str:
    stored: str | None = await conn.fetchval(
        "INSERT INTO wechat_events (appid, new_msg_id, sender, received_ms, raw) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING sender",
        appid,
        new_msg_id,
        sender,
        now,
        raw,
    )
    if stored is None:
        stored = await conn.fetchval(
            "SELECT sender FROM wechat_events WHERE appid = $1 AND new_msg_id = $2",
            appid,
            new_msg_id,
        )
    assert stored is not None
    return stored


async def _q_reconcile_wechat_owners(
    conn: asyncpg.Connection, appids: list[str], owners: list[str]
) -> tuple[int, int]:
    async with conn.transaction():
        removed = await conn.execute(
            """
            DELETE FROM user_convs uc
            USING conversations c
            WHERE c.conv = uc.conv AND c.kind = 'wechat'
              AND NOT EXISTS (
                SELECT 1 FROM unnest($1::text[], $2::text[]) AS o(appid, owner)
                WHERE o.appid = split_part(uc.conv, ':', 2) AND o.owner = uc.user_name)
            """,
            appids,
            owners,
        )
        added = await conn.execute(
            """
            INSERT INTO user_convs (user_name, conv)
            SELECT o.owner, c.conv
            FROM conversations c
            JOIN unnest($1::text[], $2::text[]) AS o(appid, owner)
              ON c.kind = 'wechat' AND split_part(c.conv, ':', 2) = o.appid
            ON CONFLICT DO NOTHING
            """,
            appids,
            owners,
        )
    return int(removed.split()[-1]), int(added.split()[-1])


async def _q_existing_users(conn: asyncpg.Connection, names: list[str]) -> set[str]:
    rows = await conn.fetch("SELECT name FROM users WHERE name = ANY($1::text[])", names)
    return {r[0] for r in rows}


async def _q_next_gid(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT nextval('group_ids')"))


async def _q_load_group(
    conn: asyncpg.Connection, gid: str
) -> tuple[dict[str, Any], list[tuple[str, str, int]]] | None:
    row = await conn.fetchrow(
        "SELECT gid, name, avatar, owner, dissolved, created_ms FROM groups WHERE gid = $1", gid
    )
    if row is None:
        return None
    members = await conn.fetch(
        "SELECT user_name, role, joined_seq FROM group_members WHERE gid = $1", gid
    )
    return dict(row), [(m[0], m[1], m[2]) for m in members]


async def _q_groups_of(conn: asyncpg.Connection, user: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT g.gid, g.name, g.avatar, g.owner, g.dissolved, m.role, "
        "(SELECT count(*) FROM group_members x WHERE x.gid = g.gid) AS n "
        "FROM group_members m JOIN groups g ON g.gid = m.gid "
        "WHERE m.user_name = $1 ORDER BY g.created_ms, g.gid",
        user,
    )
    return [
        {
            "group": r["gid"],
            "conv": f"g:{r['gid']}",
            "name": r["name"],
            "avatar": r["avatar"],
            "owner": r["owner"],
            "role": r["role"],
            "members": r["n"],
            "dissolved": r["dissolved"],
        }
        for r in rows
    ]


async def _q_message_states(conn: asyncpg.Connection, mids: list[int]) -> dict[int, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT mid, conv, seq, sender, kind, ts, recalled FROM messages "
        "WHERE mid = ANY($1::bigint[])",
        mids,
    )
    return {r["mid"]: dict(r) for r in rows}


async def _q_hide_message(conn: asyncpg.Connection, user: str, mid: int) -> dict[str, Any] | None:
    # Visible: the user has the conversation, and (a former group member)
    # the message is not past the entry that removed them.
    row = await conn.fetchrow(
        "SELECT m.conv, m.seq FROM messages m "
        "JOIN user_convs uc ON uc.user_name = $1 AND uc.conv = m.conv "
        "WHERE m.mid = $2 AND (uc.left_seq IS NULL OR m.seq <= uc.left_seq)",
        user,
        mid,
    )
    if row is None:
        return None
    await conn.execute(
        "INSERT INTO hidden_messages (user_name, mid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        user,
        mid,
    )
    return dict(row)


async def _q_conv_set(
    conn: asyncpg.Connection, user: str, conv: str, pinned: bool | None, muted: bool | None
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        "UPDATE user_convs SET pinned = COALESCE($3, pinned), muted = COALESCE($4, muted) "
        "WHERE user_name = $1 AND conv = $2 RETURNING pinned, muted",
        user,
        conv,
        pinned,
        muted,
    )
    return None if row is None else dict(row)


async def _q_create_notice(
    conn: asyncpg.Connection,
    kind: str,
    title: str,
    body: str,
    users: list[str] | None,
    now: int,
) -> int | list[str]:
    async with conn.transaction():
        if users is not None:
            known = await _q_existing_users(conn, users)
            unknown = [u for u in users if u not in known]
            if unknown:
                return unknown
        nid: int = await conn.fetchval(
            "INSERT INTO notices (kind, title, body, created_ms, to_all) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            kind,
            title,
            body,
            now,
            users is None,
        )
        if users is not None:
            await conn.execute(
                "INSERT INTO notice_recipients (user_name, notice_id) "
                "SELECT DISTINCT u, $2::bigint FROM unnest($1::text[]) AS u",
                users,
                nid,
            )
    return nid


_USER_NOTICES = """
    SELECT n.id, n.kind, n.title, n.body, n.created_ms FROM notices n
    WHERE (
        (n.to_all AND n.created_ms >= (SELECT created_ms FROM users WHERE name = $1))
        OR EXISTS (SELECT 1 FROM notice_recipients r
                   WHERE r.user_name = $1 AND r.notice_id = n.id)
    )
"""


async def _q_unread_notices(
    conn: asyncpg.Connection, user: str, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        _USER_NOTICES + " AND NOT EXISTS (SELECT 1 FROM notice_reads d WHERE d.user_name = $1 "
        "AND d.notice_id = n.id) ORDER BY n.id DESC LIMIT $2",
        user,
        limit,
    )
    return [
        {
            "id": r["id"],
            "kind": r["kind"],
            "title": r["title"],
            "body": r["body"],
            "ts": r["created_ms"],
        }
        for r in rows
    ]


async def _q_read_notice(conn: asyncpg.Connection, user: str, nid: int, now: int) -> bool:
    found = await conn.fetchval(_USER_NOTICES + " AND n.id = $2", user, nid)
    if found is None:
        return False
    await conn.execute(
        "INSERT INTO notice_reads (user_name, notice_id, read_ms) VALUES ($1, $2, $3) "
        "ON CONFLICT DO NOTHING",
        user,
        nid,
        now,
    )
    return True


# One statement, one round trip, atomic on its own: insert the batch, then move
# each conversation's last_seq and create the per-user rows of new
# conversations. A repeat of a stored (sender, cid) makes the whole statement
# fail on the messages_sender_cid unique index, so nothing of it is kept; the
# caller then sorts the repeats out and inserts the rest (PROTOCOL §5
# idempotency). A repeat is rare: the common case pays one round trip and no
# lookup of its own. (An earlier form looked every row up first with an
# EXISTS; its plan, cached while the table was small, turned into a
# sequential scan per batch as the table grew: 15,700 msg/s on a fresh data
# directory against 32,000 without it.) meta and mentions come as JSON text,
# cast here: the jsonb[] path costs a json.dumps and three ABC isinstance
# checks per element in the driver.
_INSERT_BATCH = """
WITH ins AS (
    INSERT INTO messages (conv, seq, sender, cid, kind, body, meta, mentions, reply_to, ts)
    SELECT u.conv, u.seq, u.sender, u.cid, u.kind, u.body, u.meta::jsonb, u.mentions::jsonb,
           u.reply_to, u.ts
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[])
         AS u(conv, seq, sender, cid, kind, body, meta, mentions, reply_to, ts)
    RETURNING mid, conv, seq
), last AS (
    SELECT DISTINCT ON (conv) conv, seq, mid FROM ins ORDER BY conv, seq DESC
), up AS (
    INSERT INTO conversations (conv, kind, last_seq, last_mid, last_ts)
    SELECT l.conv, k.kind, l.seq, l.mid, $11::bigint
    FROM last l JOIN unnest($12::text[], $13::text[]) AS k(conv, kind) ON k.conv = l.conv
    ON CONFLICT (conv) DO UPDATE SET last_seq = EXCLUDED.last_seq,
        last_mid = EXCLUDED.last_mid, last_ts = EXCLUDED.last_ts
), uc AS (
    INSERT INTO user_convs (user_name, conv)
    SELECT * FROM unnest($14::text[], $15::text[]) WHERE EXISTS (SELECT 1 FROM ins)
    ON CONFLICT DO NOTHING
)
SELECT mid, conv, seq FROM ins
"""


def _json_text_encoder() -> Callable[[Any], str]:
    """Compact JSON text for jsonb columns, from one encoder made once.

    ``JSONEncoder.encode`` builds its C encoder anew on every call (1.1 us for
    a small map here); the C encoder kept and called directly takes 0.4 us.
    The values are decoded frames (JSON-compatible, never circular), so the
    circular-reference check is off. Falls back to ``JSONEncoder.encode``
    where the C accelerator is missing.
    """
    encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode

    def default(o: Any) -> Any:
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    c_encode = make(
        None, default, json.encoder.encode_basestring, None, ":", ",", False, False, True
    )
    join = "".join

    def encode(o: Any) -> str:
        return join(c_encode(o, 0))

    probe = {"a": [1, 2.5, None, True, 'é"']}
    return encode if encode(probe) == encoder.encode(probe) else encoder.encode


_json_text = _json_text_encoder()


def _assign_seqs(fresh: list[SendRow], base: dict[str, int], ts: int) -> dict[str, int]:
    """Number ``fresh`` rows per conversation in batch order; return conv -> last seq."""
    new_last: dict[str, int] = {}
    for r in fresh:
        s = new_last.get(r.conv)
        if s is None:
            s = base.get(r.conv, 0)
        s += 1
        new_last[r.conv] = s
        r.seq = s
        r.ts = ts if r.own_ts is None else r.own_ts  # WeChat entries keep their own time
    return new_last


async def _q_insert_rows(
    conn: asyncpg.Connection, rows: list[SendRow], last: dict[str, int], ts: int
) -> dict[str, int]:
    """Insert a batch's messages with fresh seqs; return conv -> new last seq.

    Repeats of a stored ``(sender, cid)`` get the original's mid/conv/seq/ts
    and ``repeat=True``; repeats inside the batch fold onto their first copy.
    """
    if not rows:
        return {}
    # Repeats inside this batch.
    fresh: list[SendRow] = []
    first_in_batch: dict[tuple[str, str], SendRow] = {}
    for r in rows:
        if r.cid is not None:
            key = (r.sender, r.cid)
            if key in first_in_batch:
                r.repeat = True
                continue
            first_in_batch[key] = r
        fresh.append(r)
    # Last seqs not cached yet (first use of a conversation in this process).
    convs = {r.conv for r in fresh}
    base: dict[str, int] = {c: last[c] for c in convs if c in last}
    missing = [c for c in convs if c not in last]
    if missing:
        for rec in await conn.fetch(
            "SELECT conv, last_seq FROM conversations WHERE conv = ANY($1::text[])", missing
        ):
            base[rec["conv"]] = rec["last_seq"]
    inserted = await _q_try_insert(conn, fresh, base, ts)
    if inserted is None:
        # Some (sender, cid) is already stored: answer those as repeats.
        keyed = [r for r in fresh if r.cid is not None]
        found = await conn.fetch(
            "SELECT u.sender, u.cid, m.mid, m.conv, m.seq, m.ts "
            "FROM unnest($1::text[], $2::text[]) AS u(sender, cid) "
            "JOIN LATERAL (SELECT mid, conv, seq, ts FROM messages x "
            "WHERE x.sender = u.sender AND x.cid = u.cid) m ON true",
            [r.sender for r in keyed],
            [r.cid for r in keyed],
        )
        stored = {(f["sender"], f["cid"]): f for f in found}
        still: list[SendRow] = []
        for r in fresh:
            f = stored.get((r.sender, r.cid)) if r.cid is not None else None
            if f is not None:
                r.repeat, r.mid, r.conv, r.seq, r.ts = True, f["mid"], f["conv"], f["seq"], f["ts"]
            else:
                still.append(r)
        fresh = still
        inserted = await _q_try_insert(conn, fresh, base, ts)
        if inserted is None:
            raise StorageError("batch insert raced with another writer")
    new_last: dict[str, int] = {}
    for r in fresh:
        r.mid = inserted[(r.conv, r.seq)]
        new_last[r.conv] = r.seq
    for r in rows:
        if r.repeat and r.mid == 0 and r.cid is not None:
            first = first_in_batch[(r.sender, r.cid)]
            r.mid, r.conv, r.seq, r.ts = first.mid, first.conv, first.seq, first.ts
    return new_last


async def _q_try_insert(
    conn: asyncpg.Connection, fresh: list[SendRow], base: dict[str, int], ts: int
) -> dict[tuple[str, int], int] | None:
    """Insert ``fresh``; None (and nothing inserted) if a (sender, cid) of it is stored.

    Inside a transaction the statement runs under a savepoint, so that its
    failure on a repeat does not abort the batch's transaction.
    """
    try:
        if conn.is_in_transaction():
            async with conn.transaction():  # a savepoint
                return await _q_insert_fresh(conn, fresh, base, ts)
        return await _q_insert_fresh(conn, fresh, base, ts)
    except asyncpg.UniqueViolationError as e:
        if e.constraint_name != "messages_sender_cid":
            raise
        return None


async def _q_insert_fresh(
    conn: asyncpg.Connection, fresh: list[SendRow], base: dict[str, int], ts: int
) -> dict[tuple[str, int], int]:
    """Run :data:`_INSERT_BATCH` for ``fresh``; (conv, seq) -> mid of the inserted rows."""
    if not fresh:
        return {}
    _assign_seqs(fresh, base, ts)
    kinds = {r.conv: r.conv_kind for r in fresh}
    users: list[str] = []
    ucs: list[str] = []
    for c in [c for c in kinds if base.get(c, 0) == 0]:
        members = next(r.members for r in fresh if r.conv == c)
        users.extend(members)
        ucs.extend([c] * len(members))
    json_text = _json_text
    recs = await conn.fetch(
        _INSERT_BATCH,
        [r.conv for r in fresh],
        [r.seq for r in fresh],
        [r.sender for r in fresh],
        [r.cid for r in fresh],
        [r.kind for r in fresh],
        [r.body for r in fresh],
        [None if r.meta is None else json_text(r.meta) for r in fresh],
        [None if r.mentions is None else json_text(r.mentions) for r in fresh],
        [r.reply_to for r in fresh],
        [r.ts for r in fresh],
        ts,
        list(kinds),
        list(kinds.values()),
        users,
        ucs,
    )
    return {(m["conv"], m["seq"]): m["mid"] for m in recs}


async def _q_apply_effects(conn: asyncpg.Connection, rows: list[SendRow]) -> None:
    """Apply the group changes, recalls and mentions of a batch's inserted rows."""
    mentions: dict[tuple[str, str], int] = {}
    for r in rows:
        if r.repeat:
            continue
        e = r.effect
        if isinstance(e, GroupEffect):
            await _q_group_effect(conn, e, r.conv, r.seq)
        elif isinstance(e, RecallEffect):
            await conn.execute(
                "UPDATE messages SET body = NULL, meta = NULL, recalled = true WHERE mid = $1",
                e.mid,
            )
        if r.mentions and r.conv_kind == "group":
            for u in r.mentions:
                mentions[(u, r.conv)] = r.seq
    if mentions:
        await conn.execute(
            "UPDATE user_convs uc SET mention_seq = GREATEST(uc.mention_seq, v.s) "
            "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(u, c, s) "
            "WHERE uc.user_name = v.u AND uc.conv = v.c",
            [k[0] for k in mentions],
            [k[1] for k in mentions],
            list(mentions.values()),
        )


async def _q_group_effect(conn: asyncpg.Connection, e: GroupEffect, conv: str, seq: int) -> None:
    await conn.execute(
        "INSERT INTO groups (gid, name, avatar, owner, dissolved, created_ms) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (gid) DO UPDATE SET "
        "name = EXCLUDED.name, avatar = EXCLUDED.avatar, owner = EXCLUDED.owner, "
        "dissolved = EXCLUDED.dissolved",
        e.gid,
        e.name,
        e.avatar,
        e.owner,
        e.dissolved,
        e.created_ms,
    )
    if e.removed:
        await conn.execute(
            "DELETE FROM group_members WHERE gid = $1 AND user_name = ANY($2::text[])",
            e.gid,
            e.removed,
        )
        await conn.execute(
            "UPDATE user_convs SET left_seq = $3 WHERE conv = $1 AND user_name = ANY($2::text[])",
            conv,
            e.removed,
            seq,
        )
    if e.upsert:
        await conn.execute(
            "INSERT INTO group_members (gid, user_name, role, joined_seq) "
            "SELECT $1, v.u, v.r, v.j FROM unnest($2::text[], $3::text[], $4::bigint[]) "
            "AS v(u, r, j) ON CONFLICT (gid, user_name) DO UPDATE SET role = EXCLUDED.role",
            e.gid,
            [m[0] for m in e.upsert],
            [m[1] for m in e.upsert],
            [m[2] for m in e.upsert],
        )
    if e.added:
        # Unread starts at the entry that added them; a returning member's row reopens.
        await conn.execute(
            "INSERT INTO user_convs (user_name, conv, read_seq, delivered_seq) "
            "SELECT u, $2, $3, $3 FROM unnest($1::text[]) AS u "
            "ON CONFLICT (user_name, conv) DO UPDATE SET left_seq = NULL, "
            "read_seq = GREATEST(user_convs.read_seq, EXCLUDED.read_seq), "
            "delivered_seq = GREATEST(user_convs.delivered_seq, EXCLUDED.delivered_seq)",
            e.added,
            conv,
            seq - 1,
        )


async def _q_apply_cursors(conn: asyncpg.Connection, cursors: list[CursorUpdate]) -> None:
    for field in ("read", "delivered"):
        group = [c for c in cursors if c.field == field]
        if not group:
            continue
        col = "read_seq" if field == "read" else "delivered_seq"
        changed = await conn.fetch(
            f"UPDATE user_convs uc SET {col} = LEAST(v.s, c.last_seq, uc.left_seq) "
            "FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(u, cv, s) "
            "JOIN conversations c ON c.conv = v.cv "
            "WHERE uc.user_name = v.u AND uc.conv = v.cv "
            f"AND LEAST(v.s, c.last_seq, uc.left_seq) > uc.{col} "
            f"RETURNING uc.user_name, uc.conv, uc.{col} AS s",
            [c.user for c in group],
            [c.conv for c in group],
            [c.seq for c in group],
        )
        got = {(r["user_name"], r["conv"]): r["s"] for r in changed}
        for c in group:
            s = got.get((c.user, c.conv))
            if s is not None:
                c.changed = True
                c.seq = s
