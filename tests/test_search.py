"""Message search (``imserver.storage.search.q_search``) against the real PostgreSQL.

Most tests load rows with SQL through ``Storage._acquire_run`` (exact control
of seqs, left_seq, hidden and recalled rows); one goes through the real server
(send, recall, delete, group removal); a Hypothesis test compares every page
of ``q_search`` with a plain-Python model over random small data sets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import trio
from hypothesis import given, settings, target
from hypothesis import strategies as st

from imserver.storage.db import Storage
from imserver.storage.search import MAX_LIMIT, like_pattern, q_search, search_sql

from .conftest import Clients, befriend

# (conv, sender, body, kind, recalled)
Msg = tuple[str, str, str | None, str, bool]


@pytest.fixture
async def storage(db_dsn: str) -> AsyncIterator[Storage]:
    s = Storage(db_dsn, pool_size=1)
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def _q_load(
    conn: asyncpg.Connection, members: list[tuple[str, str, int | None]], msgs: list[Msg]
) -> list[int]:
    """Conversations, ``user_convs`` rows (user, conv, left_seq) and messages; their mids."""
    convs = sorted({c for _, c, _ in members} | {m[0] for m in msgs})
    await conn.execute(
        "INSERT INTO conversations (conv, kind) SELECT c, 'group' FROM unnest($1::text[]) c "
        "ON CONFLICT DO NOTHING",
        convs,
    )
    await conn.executemany(
        "INSERT INTO user_convs (user_name, conv, left_seq) VALUES ($1, $2, $3)", members
    )
    last = {
        r["conv"]: r["last_seq"]
        for r in await conn.fetch(
            "SELECT conv, last_seq FROM conversations WHERE conv = ANY($1::text[])", convs
        )
    }
    mids = []
    for conv, sender, body, kind, recalled in msgs:
        last[conv] += 1
        mids.append(
            await conn.fetchval(
                "INSERT INTO messages (conv, seq, sender, cid, kind, body, ts, recalled) "
                "VALUES ($1, $2, $3, $4, $5, $6, 0, $7) RETURNING mid",
                conv,
                last[conv],
                sender,
                f"c{last[conv]}-{conv}",
                kind,
                body,
                recalled,
            )
        )
        await conn.execute(
            "UPDATE conversations SET last_seq = $2, last_mid = $3 WHERE conv = $1",
            conv,
            last[conv],
            mids[-1],
        )
    return mids


async def _q_hide(conn: asyncpg.Connection, user: str, mids: list[int]) -> None:
    await conn.executemany(
        "INSERT INTO hidden_messages (user_name, mid) VALUES ($1, $2)", [(user, m) for m in mids]
    )


async def load(
    storage: Storage, members: list[tuple[str, str, int | None]], msgs: list[Msg]
) -> list[int]:
    return await storage._acquire_run(_q_load, members, msgs)


async def search(
    storage: Storage,
    viewer: str,
    q: str,
    conv: str | None = None,
    limit: int = 50,
    before_mid: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    return await storage._acquire_run(q_search, viewer, q, conv, limit, before_mid)


def text(conv: str, body: str, sender: str = "bob") -> Msg:
    return (conv, sender, body, "text", False)


def bodies(found: list[dict[str, Any]]) -> list[str]:
    return [m["body"] for m in found]


# ---------------------------------------------------------------- matching


async def test_cjk_two_chars_inside_a_sentence(storage: Storage) -> None:
    members = [("alice", "g:1", None)]
    await load(
        storage,
        members,
        [
            text("g:1", "大家好，你好吗"),
            text("g:1", "你们好"),
            text("g:1", "好你"),
            text("g:1", "x"),
        ],
    )
    found, more = await search(storage, "alice", "你好")
    assert bodies(found) == ["大家好，你好吗"] and more is False
    assert bodies((await search(storage, "alice", "好，你"))[0]) == ["大家好，你好吗"]
    assert bodies((await search(storage, "alice", "好"))[0]) == ["好你", "你们好", "大家好，你好吗"]
    assert bodies((await search(storage, "alice", "大家好，你好吗"))[0]) == ["大家好，你好吗"]
    assert (await search(storage, "alice", "大家好，你好吗？"))[0] == []


async def test_latin_is_case_insensitive(storage: Storage) -> None:
    await load(
        storage, [("alice", "g:1", None)], [text("g:1", "Hello World"), text("g:1", "HELLO")]
    )
    assert bodies((await search(storage, "alice", "hello"))[0]) == ["HELLO", "Hello World"]
    assert bodies((await search(storage, "alice", "o wOR"))[0]) == ["Hello World"]
    assert bodies((await search(storage, "alice", "WORLD"))[0]) == ["Hello World"]


async def test_like_wildcards_are_literal(storage: Storage) -> None:
    msgs = ["100% sure", "100 percent", "a_b", "axb", "back\\slash", "backslash", "50%_off"]
    await load(storage, [("alice", "g:1", None)], [text("g:1", b) for b in msgs])

    async def hits(q: str) -> list[str]:
        return sorted(bodies((await search(storage, "alice", q))[0]))

    assert await hits("%") == ["100% sure", "50%_off"]
    assert await hits("0%") == ["100% sure", "50%_off"]
    assert await hits("_") == ["50%_off", "a_b"]
    assert await hits("a_b") == ["a_b"]
    assert await hits("\\") == ["back\\slash"]
    assert await hits("k\\s") == ["back\\slash"]
    assert await hits("%_") == ["50%_off"]
    assert await hits("\\%") == []
    assert like_pattern("a%b_c\\") == "%a\\%b\\_c\\\\%"


async def test_sql_choice_by_case(storage: Storage) -> None:
    # Plain LIKE only when q has no letter with case; both give the same rows.
    assert "ILIKE" not in search_sql("你好 100%")
    assert "ILIKE" in search_sql("你好a")
    await load(storage, [("alice", "g:1", None)], [text("g:1", "你好A"), text("g:1", "你好a")])
    assert len((await search(storage, "alice", "你好a"))[0]) == 2


# ---------------------------------------------------------------- visibility


async def test_never_another_users_conversation(storage: Storage) -> None:
    members = [("alice", "d:alice:bob", None), ("bob", "d:alice:bob", None)]
    members += [("bob", "d:bob:carol", None), ("carol", "d:bob:carol", None)]
    await load(
        storage,
        members,
        [text("d:alice:bob", "你好 alice"), text("d:bob:carol", "你好 secret")],
    )
    assert bodies((await search(storage, "alice", "你好"))[0]) == ["你好 alice"]
    assert await search(storage, "alice", "secret") == ([], False)
    assert await search(storage, "alice", "你好", conv="d:bob:carol") == ([], False)
    assert await search(storage, "alice", "你好", conv="d:nobody:here") == ([], False)
    assert bodies((await search(storage, "bob", "你好"))[0]) == ["你好 secret", "你好 alice"]
    assert await search(storage, "dave", "你好") == ([], False)


async def test_former_member_sees_up_to_left_seq(storage: Storage) -> None:
    # alice left g:1 at seq 3 (the removal entry); bob is still a member.
    members = [("alice", "g:1", 3), ("bob", "g:1", None)]
    await load(
        storage,
        members,
        [
            text("g:1", "match one"),
            text("g:1", "match two"),
            ("g:1", "bob", "alice removed (match)", "system", False),
            text("g:1", "match after"),
        ],
    )
    assert bodies((await search(storage, "alice", "match"))[0]) == ["match two", "match one"]
    assert bodies((await search(storage, "alice", "match", conv="g:1"))[0]) == [
        "match two",
        "match one",
    ]
    assert bodies((await search(storage, "bob", "match"))[0]) == [
        "match after",
        "match two",
        "match one",
    ]


async def test_hidden_recalled_and_system_entries_excluded(storage: Storage) -> None:
    members = [("alice", "g:1", None), ("bob", "g:1", None)]
    mids = await load(
        storage,
        members,
        [
            text("g:1", "你好 kept"),
            text("g:1", "你好 hidden by alice"),
            ("g:1", "bob", "你好 recalled", "text", True),
            ("g:1", "bob", None, "text", True),
            ("g:1", "bob", "你好 system", "system", False),
            ("g:1", "bob", "你好 recall entry", "recall", False),
            ("g:1", "bob", "你好 caption", "image", False),
        ],
    )
    await storage._acquire_run(_q_hide, "alice", [mids[1]])
    assert bodies((await search(storage, "alice", "你好"))[0]) == ["你好 caption", "你好 kept"]
    assert bodies((await search(storage, "bob", "你好"))[0]) == [
        "你好 caption",
        "你好 hidden by alice",
        "你好 kept",
    ]


async def test_result_is_the_message_map(storage: Storage) -> None:
    await load(
        storage,
        [("alice", "g:1", None), ("bob", "g:1", None)],
        [text("g:1", "hi there", sender="alice")],
    )
    (mine,), _ = await search(storage, "alice", "there")
    assert mine["conv"] == "g:1" and mine["seq"] == 1 and mine["from"] == "alice"
    assert mine["kind"] == "text" and mine["body"] == "hi there" and mine["cid"] == "c1-g:1"
    (theirs,), _ = await search(storage, "bob", "there")
    assert "cid" not in theirs and theirs["mid"] == mine["mid"]


# ---------------------------------------------------------------- paging, limits, conv


async def test_limit_more_and_before_mid_paging(storage: Storage) -> None:
    members = [("alice", "g:1", None), ("alice", "d:alice:bob", None)]
    msgs = []
    for i in range(25):
        msgs.append(text("g:1" if i % 3 else "d:alice:bob", f"hit {i}"))
        msgs.append(text("g:1", f"miss {i}"))
    mids = await load(storage, members, msgs)
    want = sorted(mids[0::2], reverse=True)
    got: list[int] = []
    before = None
    pages = []
    while True:
        found, more = await search(storage, "alice", "hit", limit=10, before_mid=before)
        pages.append((len(found), more))
        got += [m["mid"] for m in found]
        if not more:
            break
        before = found[-1]["mid"]
    assert pages == [(10, True), (10, True), (5, False)]
    assert got == want
    # Exactly limit matches left: more is False.
    found, more = await search(storage, "alice", "hit", limit=25)
    assert len(found) == 25 and more is False
    found, more = await search(storage, "alice", "hit", limit=24)
    assert len(found) == 24 and more is True
    assert await search(storage, "alice", "hit", before_mid=min(mids)) == ([], False)


async def test_conv_restriction(storage: Storage) -> None:
    members = [("alice", "g:1", None), ("alice", "g:2", None)]
    await load(storage, members, [text("g:1", "你好 one"), text("g:2", "你好 two")])
    assert bodies((await search(storage, "alice", "你好", conv="g:1"))[0]) == ["你好 one"]
    assert bodies((await search(storage, "alice", "你好", conv="g:2"))[0]) == ["你好 two"]
    assert bodies((await search(storage, "alice", "你好"))[0]) == ["你好 two", "你好 one"]


async def test_empty_and_impossible_queries(storage: Storage) -> None:
    await load(storage, [("alice", "g:1", None)], [text("g:1", "something")])
    assert await search(storage, "alice", "nothing") == ([], False)
    assert await search(storage, "alice", "") == ([], False)
    assert await search(storage, "alice", "some\x00thing") == ([], False)
    assert await search(storage, "alice", "\ud800") == ([], False)
    assert await search(storage, "alice", "some", conv="g:\x00") == ([], False)
    with pytest.raises(ValueError, match="limit"):
        await search(storage, "alice", "some", limit=0)
    with pytest.raises(ValueError, match="limit"):
        await search(storage, "alice", "some", limit=MAX_LIMIT + 1)
    assert len((await search(storage, "alice", "some", limit=MAX_LIMIT))[0]) == 1
    # Out-of-range page bounds from a client are no driver error.
    assert await search(storage, "alice", "some", before_mid=1) == ([], False)
    assert await search(storage, "alice", "some", before_mid=-(2**70)) == ([], False)
    assert len((await search(storage, "alice", "some", before_mid=2**70))[0]) == 1
    assert await search(storage, "nobody", "some") == ([], False)


# ---------------------------------------------------------------- through the real server


async def test_through_the_server(clients: Clients, db_dsn: str) -> None:
    """Rows made by real sends, recall, delete and group removal."""
    with trio.fail_after(30):
        alice = await clients.user("alice")
        bob = await clients.user("bob")
        carol = await clients.user("carol")
        await befriend(alice, bob)
        await befriend(bob, carol)
        m1 = await alice.ok("send", to="bob", cid="m1", body="大家好，你好吗")
        await alice.ok("send", to="bob", cid="m2", body="Hello WORLD 100%")
        m3 = await alice.ok("send", to="bob", cid="m3", body="你好 to recall")
        await alice.ok("recall", mid=m3["mid"])
        m4 = await bob.ok("send", to="alice", cid="m4", body="你好 to delete")
        await alice.ok("delete", mid=m4["mid"])
        await bob.ok("send", to="carol", cid="m5", body="你好 carol secret")
        g = await bob.ok("group_create", name="team", members=["alice", "carol"])
        gid = g["group"]
        before = await carol.ok("send", group=gid, cid="m6", body="你好 before")
        await bob.ok("group_remove", group=gid, users=["alice"])
        await carol.ok("send", group=gid, cid="m7", body="你好 after")

        storage = Storage(db_dsn, pool_size=1)
        await storage.open()
        try:
            found, more = await search(storage, "alice", "你好")
            assert [m["mid"] for m in found] == [before["mid"], m1["mid"]] and not more
            assert found[1]["cid"] == "m1" and found[1]["conv"] == "d:alice:bob"
            assert bodies((await search(storage, "alice", "world 100%"))[0]) == ["Hello WORLD 100%"]
            assert await search(storage, "alice", "你好", conv=f"g:{gid}", limit=1) == (
                found[:1],
                False,
            )
            assert bodies((await search(storage, "bob", "你好"))[0]) == [
                "你好 after",
                "你好 before",
                "你好 carol secret",
                "你好 to delete",
                "大家好，你好吗",
            ]
        finally:
            await storage.aclose()


# ---------------------------------------------------------------- model


ALPHABET = "你好a A%_\\，"
CHARS = st.sampled_from(ALPHABET)
USERS = ("v", "w")


@dataclass
class World:
    convs: list[str]
    # (user, conv) -> left_seq (None: a current member); absent: no user_convs row.
    member: dict[tuple[str, str], int | None]
    msgs: list[Msg]
    hidden: set[tuple[str, int]]  # (user, index into msgs)


@st.composite
def worlds(draw: st.DrawFn) -> World:
    convs = [f"g:{i}" for i in range(draw(st.integers(1, 3)))]
    member: dict[tuple[str, str], int | None] = {}
    for c in convs:
        for u in USERS:
            state = draw(st.sampled_from(["none", "member", "member", "member", "left"]))
            if state == "member":
                member[(u, c)] = None
            elif state == "left":
                member[(u, c)] = draw(st.integers(0, 8))
    msgs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(convs),
                st.sampled_from(USERS),
                st.tuples(st.integers(0, 9), st.lists(CHARS, max_size=6)).map(
                    lambda t: None if t[0] == 0 else "".join(t[1])
                ),
                st.sampled_from(["text"] * 5 + ["image", "system", "recall"]),
                st.sampled_from([False] * 5 + [True]),
            ),
            min_size=2,
            max_size=20,
        )
    )
    hidden = draw(st.sets(st.tuples(st.sampled_from(USERS), st.integers(0, max(0, len(msgs) - 1)))))
    return World(convs, member, msgs, {h for h in hidden if h[1] < len(msgs)})


def _pieces(body: str) -> st.SearchStrategy[str]:
    """Non-empty substrings of ``body``, some with their case swapped."""
    return st.tuples(st.integers(0, len(body) - 1), st.integers(1, 3), st.booleans()).map(
        lambda t: (lambda p: p.swapcase() if t[2] else p)(body[t[0] : t[0] + t[1]])
    )


def model(world: World, mids: list[int], viewer: str, q: str, conv: str | None) -> list[int]:
    """The visible matches' mids, newest first: the search contract in plain Python."""
    seq: dict[str, int] = {}
    out = []
    for i, (c, _sender, body, kind, recalled) in enumerate(world.msgs):
        seq[c] = seq.get(c, 0) + 1
        if (viewer, c) not in world.member or (conv is not None and c != conv):
            continue
        left = world.member[(viewer, c)]
        if left is not None and seq[c] > left:
            continue
        if recalled or kind in ("system", "recall") or (viewer, i) in world.hidden:
            continue
        if body is not None and q.lower() in body.lower():
            out.append(mids[i])
    return sorted(out, reverse=True)


async def _q_reset(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "TRUNCATE hidden_messages, messages, user_convs, conversations RESTART IDENTITY CASCADE"
    )


@pytest.fixture
def model_conn(db_dsn: str) -> Iterator[tuple[asyncio.AbstractEventLoop, asyncpg.Connection]]:
    """One plain asyncpg connection on a private asyncio loop (the asyncio side)."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(db_dsn))
    loop.run_until_complete(
        conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    )
    try:
        yield loop, conn
    finally:
        loop.run_until_complete(conn.close())
        loop.close()


def test_matches_the_model(
    model_conn: tuple[asyncio.AbstractEventLoop, asyncpg.Connection],
) -> None:
    loop, conn = model_conn

    @settings(max_examples=200, deadline=None)
    @given(
        world=worlds(),
        viewer=st.sampled_from(USERS),
        data=st.data(),
        conv=st.sampled_from([None, None, None, "g:0", "g:1", "g:9"]),
        limit=st.integers(1, 4),
    )
    def check(world: World, viewer: str, data: st.DataObject, conv: str | None, limit: int) -> None:
        # Mostly a piece of a stored body (so that matches are common), else any text.
        texts = [b for c, _, b, _, _ in world.msgs if b and (viewer, c) in world.member]
        if texts and data.draw(st.integers(0, 4), label="piece") > 0:
            q = data.draw(st.sampled_from(texts).flatmap(_pieces), label="q")
        else:
            q = data.draw(st.lists(CHARS, min_size=1, max_size=3).map("".join), label="q")

        async def run() -> None:
            await _q_reset(conn)
            members = [(u, c, left) for (u, c), left in world.member.items()]
            mids = await _q_load(conn, members, world.msgs)
            await conn.executemany(
                "INSERT INTO hidden_messages (user_name, mid) VALUES ($1, $2)",
                [(u, mids[i]) for u, i in world.hidden],
            )
            want = model(world, mids, viewer, q, conv)
            # Steer generation towards data sets with many matches (and pages).
            target(float(len(want)), label="matches")
            target(float(len(want) // limit), label="pages")
            got: list[int] = []
            before = None
            for _ in range(len(want) + 2):
                found, more = await q_search(conn, viewer, q, conv, limit, before)
                assert len(found) <= limit
                assert all(q.lower() in m["body"].lower() for m in found)
                got += [m["mid"] for m in found]
                assert more == (len(got) < len(want)), (got, want)
                if not more:
                    break
                before = found[-1]["mid"]
            assert got == want

        loop.run_until_complete(run())

    check()
