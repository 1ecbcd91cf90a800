"""Token lookups batched per round (imserver.services.token_lookups), on real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from imserver.services.auth import token_hash
from imserver.services.token_lookups import TokenLookups
from imserver.storage.db import Storage
from imserver.storage.errors import StorageError, StorageUnavailable


@pytest.fixture
async def storage(db_dsn: str) -> AsyncIterator[Storage]:
    s = Storage(db_dsn, pool_size=2)
    await s.open()
    try:
        await s.create_user("alice", "x")
        await s.create_user("bob", "x")
        yield s
    finally:
        await s.aclose()


async def test_concurrent_lookups_share_rounds_and_see_revocation(storage: Storage) -> None:
    tokens = {f"t{i}": "alice" if i % 2 else "bob" for i in range(300)}
    for t, user in tokens.items():
        await storage.insert_token(token_hash(t), user, "d", 0, 10**15)
    lookups = TokenLookups(storage)
    got: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(lookups.run)

        async def ask(t: str) -> None:
            got[t] = await lookups.owner(token_hash(t))

        for t in [*tokens, "unknown-1", "unknown-2", "t1"]:
            nursery.start_soon(ask, t)
        await trio.sleep(0.5)
        assert len(got) == len(tokens) + 2
        assert all(got[t] == (u, 10**15, False) for t, u in tokens.items())
        assert got["unknown-1"] is None and got["unknown-2"] is None
        assert lookups.rounds <= 5, lookups.rounds  # not one query per token
        # Nothing is cached: a revocation is seen by the next lookup.
        await storage.revoke_token(token_hash("t1"))
        assert await lookups.owner(token_hash("t1")) == ("alice", 10**15, True)
        # A cancelled caller does not disturb the others.
        with trio.move_on_after(0):
            await lookups.owner(token_hash("t2"))
        assert await lookups.owner(token_hash("t2")) == ("bob", 10**15, False)
        nursery.cancel_scope.cancel()
    # Not running: each lookup is a query of its own.
    assert not lookups.running
    assert await lookups.owner(token_hash("t3")) == ("alice", 10**15, False)


class _FailingStorage:
    """Stands in for a storage whose every query fails (the error path only)."""

    queries = 0

    async def token_owners(self, hashes: list[bytes]) -> dict[bytes, object]:
        self.queries += 1
        await trio.sleep(0.01)
        raise StorageUnavailable("storage unavailable: test")


async def test_a_failed_round_fails_its_callers() -> None:
    failing = _FailingStorage()
    lookups = TokenLookups(failing)  # type: ignore[arg-type]
    failures: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lookups.run)

        async def ask(t: str) -> None:
            try:
                await lookups.owner(token_hash(t))
            except StorageError as e:
                failures.append(e)

        async with trio.open_nursery() as callers:
            for i in range(20):
                callers.start_soon(ask, f"x{i}")
        nursery.cancel_scope.cancel()
    assert len(failures) == 20
    assert all(isinstance(e, StorageUnavailable) for e in failures)
    assert failing.queries <= 3
