"""Message search: substring matches in the viewer's own conversations.

``q_search`` runs on the asyncio side, like the ``_q_*`` functions of
:mod:`imserver.storage.db`; the Trio side calls it through
``Storage._acquire_run(q_search, viewer, q, conv, limit, before_mid)``, which
also translates driver errors (nothing of asyncpg leaves the package).

Matching is ``body ILIKE '%q%'`` with ``q``'s LIKE wildcards escaped, so ``q``
is a plain substring: CJK text matches by substring (``你好`` in
``大家好，你好吗``), ASCII letters case-insensitively. (Non-ASCII case folding
follows the database's LC_CTYPE; the embedded cluster runs ``--locale=C``,
under which only ASCII letters fold.)

Plan (docs/benchmarks.md, "Search over 1,000,000 messages"): no text index.
One ``LATERAL`` subquery per conversation of the viewer walks that
conversation newest first through the ``(conv, seq)`` unique index, filters
by the pattern and stops after ``limit + 1`` matches; the outer query keeps
the newest ``limit + 1`` of those by ``mid``. The cost is bounded by the
viewer's own messages (a term that never matches reads all of them once),
never by the whole table, and a common term stops early. Within one
conversation ``seq`` order is ``mid`` order (both follow commit order,
PROTOCOL §4), so each conversation's first ``limit + 1`` by ``seq`` are its
first ``limit + 1`` by ``mid``.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from .db import MSG_COLUMNS, msg_to_frame

#: No ``mid`` reaches this; the bound used when no ``before_mid`` is given.
_NO_BOUND = 2**63 - 1

#: The largest ``limit`` accepted (``limit + 1`` is sent as an int4 parameter).
MAX_LIMIT = 10_000

_COLS = ", ".join("m." + c for c in MSG_COLUMNS.split(", "))

# $1 viewer, $2 ILIKE pattern, $3 mids below this, $4 limit + 1, $5 conv or NULL.
# The message filters match _q_history/_q_sync: left_seq caps a former group
# member, hidden_messages are the viewer's own deletions, recalled messages
# have no body; system and recall entries are not messages anyone wrote.
# The hidden check is a scalar subquery on purpose: as NOT EXISTS the planner
# may turn it into an anti join that reads a conversation's every match before
# LIMIT; this way it is one primary-key probe per matching row, done last.
_SEARCH_SQL = """
SELECT s.* FROM user_convs uc
CROSS JOIN LATERAL (
    SELECT {cols} FROM messages m
    WHERE m.conv = uc.conv
      AND m.seq <= COALESCE(uc.left_seq, {no_bound})
      AND m.mid < $3
      AND m.body {op} $2 ESCAPE '\\'
      AND NOT m.recalled
      AND m.kind NOT IN ('system', 'recall')
      AND (SELECT h.mid FROM hidden_messages h
           WHERE h.user_name = $1 AND h.mid = m.mid) IS NULL
    ORDER BY m.seq DESC
    LIMIT $4
) s
WHERE uc.user_name = $1 AND ($5::text IS NULL OR uc.conv = $5::text)
ORDER BY s.mid DESC
LIMIT $4
"""


#: Run (in the search's transaction) before the statement; see :func:`q_search`.
PLAN_SETTINGS = "SET LOCAL enable_bitmapscan = off"

#: The statement for a ``q`` with letters (case-insensitive) and without.
SEARCH_SQL_ILIKE = _SEARCH_SQL.format(cols=_COLS, no_bound=_NO_BOUND, op="ILIKE")
SEARCH_SQL_LIKE = _SEARCH_SQL.format(cols=_COLS, no_bound=_NO_BOUND, op="LIKE")


def search_sql(q: str) -> str:
    """The statement for ``q``: plain LIKE when ``q`` has no cased letter (CJK, digits).

    ILIKE lower-cases every body it reads (about twice the cost per row, measured);
    when ``q`` has no letter with case, both find the same rows.
    """
    return SEARCH_SQL_LIKE if q.lower() == q.upper() else SEARCH_SQL_ILIKE


def like_pattern(q: str) -> str:
    r"""``q`` as an ``ILIKE ... ESCAPE '\'`` pattern matching it as a plain substring."""
    escaped = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def searchable(q: str) -> bool:
    """Whether any stored body could contain ``q``.

    False for the empty string (the route should refuse it), for ``q`` with a
    NUL (PostgreSQL text cannot hold one) and for ``q`` that is not valid
    UTF-8 text (a lone surrogate from a JSON ``\\ud800`` escape).
    """
    if not q or "\x00" in q:
        return False
    try:
        q.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def search_args(
    viewer: str, q: str, conv: str | None, limit: int, before_mid: int | None
) -> tuple[str, str, int, int, str | None]:
    """The parameters of :func:`search_sql`'s statement (the bench EXPLAINs the same one)."""
    bound = min(before_mid, _NO_BOUND) if before_mid is not None else _NO_BOUND
    return viewer, like_pattern(q), bound, limit + 1, conv


async def q_search(
    conn: asyncpg.Connection,
    viewer: str,
    q: str,
    conv: str | None,
    limit: int,
    before_mid: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Messages visible to ``viewer`` whose body contains ``q``, newest first.

    Args:
        conn: a pooled connection (asyncio side).
        viewer: the searching user.
        q: the substring; LIKE wildcards in it are literal. An empty ``q``,
            or one no text can contain (see :func:`searchable`), finds nothing.
        conv: only this conversation; one ``viewer`` has no ``user_convs``
            row for finds nothing (no error).
        limit: at most this many results, 1 to :data:`MAX_LIMIT` (the route
            should bound it tighter, like ``history``'s 1-200).
        before_mid: only messages with a smaller ``mid`` (the next page:
            the last ``mid`` of the previous one). Any int is accepted (one
            beyond bigint means no bound; 1 or less finds nothing).

    Returns:
        ``(msgs, more)``: the ``msg_to_frame`` maps (each has ``conv``) in
        descending ``mid`` order, and whether more matches exist past the last.

    Raises:
        ValueError: ``limit`` is outside 1 to :data:`MAX_LIMIT`.

    Opens its own read-only transaction: call it on a connection that is not
    in one (``Storage._acquire_run`` gives such a connection).
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_LIMIT}")
    if not searchable(q) or (conv is not None and not searchable(conv)):
        return [], False
    if before_mid is not None and before_mid <= 1:
        return [], False
    async with conn.transaction(readonly=True):
        # Plan stability: with a pattern it believes rare, the planner reads a
        # conversation's every row through a bitmap scan and sorts them, even
        # when the term is common and the newest few rows would have done
        # (measured: 1 ms becomes 80-120 ms on a 100,000-message conversation). The
        # ordered index scan it falls back to costs the same when nothing matches.
        await conn.execute(PLAN_SETTINGS)
        rows = await conn.fetch(search_sql(q), *search_args(viewer, q, conv, limit, before_mid))
    more = len(rows) > limit
    return [msg_to_frame(r, viewer) for r in rows[:limit]], more
