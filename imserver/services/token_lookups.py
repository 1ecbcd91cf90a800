"""Token lookups batched into one query per round, like the writer batches commits.

When many clients authenticate at once (a reconnect storm after a network
blip or a restart), one query per token means one bridge hop and one round
trip each: thousands of them queue for the pool while the clients' auth
timeouts run. :class:`TokenLookups` collects the token hashes asked for while
its previous query runs and fetches them all with one
``WHERE hash = ANY($1)``; under no load a lookup is still one query.

Nothing is cached: every answer comes from PostgreSQL as it is when the
round's query runs, so a revocation is seen by every later lookup exactly as
before. A caller that is cancelled simply stops waiting; its hash may still
be fetched. While :meth:`run` is not running (unit tests that wire the
services without a nursery), each lookup is a query of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..storage.db import Storage
from ..storage.errors import StorageError, StorageUnavailable

log = logging.getLogger("imserver.auth")

#: Most hashes in one query; more wait for the next round.
MAX_BATCH = 1000

Owner = tuple[str, int, bool]


class _Slot:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Owner | None = None
        self.error: StorageError | None = None


class TokenLookups:
    """Coalesces concurrent token lookups (owner, expiry, revoked) into rounds."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.running = False
        self.rounds = 0
        self._waiting: dict[bytes, _Slot] = {}
        self._wakeup = trio.Event()

    async def owner(self, token_hash: bytes) -> Owner | None:
        """(user, expires_ms, revoked) of a token hash, or None if unknown.

        Raises:
            StorageError: PostgreSQL failed or is unavailable.
        """
        if not self.running:
            return await self.storage.token_owner(token_hash)
        slot = self._waiting.get(token_hash)
        if slot is None:
            slot = self._waiting[token_hash] = _Slot()
            self._wakeup.set()
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve lookups in rounds until cancelled."""
        self.running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._waiting:
                    await self._round()
        finally:
            self.running = False
            pending, self._waiting = self._waiting, {}
            for slot in pending.values():
                slot.error = StorageUnavailable("server is shutting down")
                slot.done.set()

    async def _round(self) -> None:
        hashes = list(self._waiting)[:MAX_BATCH]
        slots = {h: self._waiting.pop(h) for h in hashes}
        found: dict[bytes, Any] = {}
        error: StorageError | None = None
        # Shielded: a started round always answers its callers (the query is
        # bounded by database.query_timeout on the storage side).
        with trio.CancelScope(shield=True):
            try:
                found = await self.storage.token_owners(hashes)
            except StorageError as e:
                error = e
        self.rounds += 1
        for h, slot in slots.items():
            slot.result = found.get(h)
            slot.error = error
            slot.done.set()
