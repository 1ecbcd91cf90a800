"""The batch insert on real PostgreSQL: repeats of stored cids, meta and mentions.

The insert relies on the ``(sender, cid)`` unique index to refuse a repeat: a
batch without cursors or effects runs it as one autocommit statement, a batch
in a transaction under a savepoint. Both must answer a repeat with the
original and number the rest without a gap.
"""

from __future__ import annotations

from typing import Any

import pytest

from imserver.services.chat import direct_conv
from imserver.storage.db import Storage
from imserver.storage.records import CursorUpdate, SendRow

CONV = direct_conv("alice", "bob")


def _row(cid: str, meta: dict[str, Any] | None = None) -> SendRow:
    return SendRow(
        sender="alice",
        cid=cid,
        conv=CONV,
        conv_kind="direct",
        kind="text",
        body=f"body {cid}",
        meta=meta,
        mentions=None,
        reply_to=None,
        members=("alice", "bob"),
    )


@pytest.fixture
async def dsn(db_dsn: str) -> str:
    s = Storage(db_dsn, pool_size=2)
    await s.open()
    try:
        await s.create_user("alice", "x")
        await s.create_user("bob", "x")
    finally:
        await s.aclose()
    return db_dsn


async def _commit(dsn: str, rows: list[SendRow], cursors: list[CursorUpdate]) -> list[SendRow]:
    """Commit one batch on a fresh Storage (as after a restart: nothing cached)."""
    s = Storage(dsn, pool_size=2)
    await s.open()
    try:
        return (await s.commit_batch(rows, cursors)).rows
    finally:
        await s.aclose()


async def _history(dsn: str, conv: str = CONV) -> list[dict[str, Any]]:
    s = Storage(dsn, pool_size=2)
    await s.open()
    try:
        got = await s.history("alice", conv, None, None, 100)
        assert got is not None
        return got[0]
    finally:
        await s.aclose()


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "transaction"])
async def test_stored_repeats_answer_with_the_original(dsn: str, in_transaction: bool) -> None:
    first = await _commit(dsn, [_row("c1"), _row("c2")], [])
    assert [(r.seq, r.repeat) for r in first] == [(1, False), (2, False)]
    originals = {r.cid: (r.mid, r.seq, r.ts) for r in first}

    # A cursor update puts the batch in a transaction (the guarded statement).
    cursors = [CursorUpdate("bob", CONV, "read", 1)] if in_transaction else []
    batch = [_row("c2"), _row("c3"), _row("c1"), _row("c4"), _row("c3")]
    second = await _commit(dsn, batch, cursors)

    assert [(r.cid, r.repeat) for r in second] == [
        ("c2", True),
        ("c3", False),
        ("c1", True),
        ("c4", False),
        ("c3", True),  # a repeat inside the batch folds onto its first copy
    ]
    assert (second[0].mid, second[0].seq, second[0].ts) == originals["c2"]
    assert (second[2].mid, second[2].seq, second[2].ts) == originals["c1"]
    assert [second[1].seq, second[3].seq] == [3, 4]
    assert second[4].mid == second[1].mid and second[4].seq == 3

    stored = await _history(dsn)
    assert [m["seq"] for m in stored] == [1, 2, 3, 4]
    assert [m["cid"] for m in stored] == ["c1", "c2", "c3", "c4"]


async def test_a_batch_of_only_repeats_inserts_nothing(dsn: str) -> None:
    await _commit(dsn, [_row("c1")], [])
    again = await _commit(dsn, [_row("c1"), _row("c1")], [])
    assert all(r.repeat and r.seq == 1 for r in again)
    assert [m["seq"] for m in await _history(dsn)] == [1]
    # The next fresh message still gets the next number: no gap.
    (nxt,) = await _commit(dsn, [_row("c2")], [])
    assert (nxt.seq, nxt.repeat) == (2, False)


async def test_meta_round_trips_as_json(dsn: str) -> None:
    meta = {"t": 2**62, "name": 'héllo 世界 "q" \\', "list": [1, 2.5, None, True, {"a": []}]}
    await _commit(dsn, [_row("m1", meta), _row("m2")], [])
    stored = await _history(dsn)
    assert stored[0]["meta"] == meta
    assert "meta" not in stored[1] or stored[1]["meta"] is None


def _group_row(cid: str, mentions: list[str] | None) -> SendRow:
    return SendRow(
        sender="alice",
        cid=cid,
        conv="g:1",
        conv_kind="group",
        kind="text",
        body=cid,
        meta=None,
        mentions=mentions,
        reply_to=None,
        members=(),
    )


async def test_mentions_are_stored_as_lists(dsn: str) -> None:
    """One, two and no mentions in one batch (the jsonb[] path broke on lists)."""
    batch = [
        _group_row("one", ["bob"]),
        _group_row("none", None),
        _group_row("two", ["bob", "carol"]),
    ]
    rows = await _commit(dsn, batch, [])
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [m.get("mentions") for m in await _history(dsn, "g:1")] == [
        ["bob"],
        None,
        ["bob", "carol"],
    ]


async def test_migration_0005_turns_stored_string_mentions_into_lists(dsn: str) -> None:
    from importlib import resources

    from .conftest import _admin

    await _commit(dsn, [_group_row("one", ["bob"]), _group_row("two", ["bob", "carol"])], [])
    # As the earlier insert stored one mention: a bare JSON string.
    _admin(dsn, """UPDATE messages SET mentions = '"bob"'::jsonb WHERE cid = 'one'""")
    sql = resources.files("imserver.storage.migrations").joinpath("0005_mentions_arrays.sql")
    _admin(dsn, sql.read_text())
    assert [m.get("mentions") for m in await _history(dsn, "g:1")] == [["bob"], ["bob", "carol"]]
