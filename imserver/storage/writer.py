"""The batching writer: group commit of messages and cursors.

Theory of operation
-------------------
Sessions hand rows to :meth:`BatchWriter.submit_send` / :meth:`submit_cursor`,
which never block: the queue is bounded by ``batch.max_queue`` and a full queue
raises :class:`StorageUnavailable` at once (the client gets ``unavailable``;
nothing is dropped silently).

One writer task takes everything queued, up to ``batch.max_rows`` messages,
and commits it in one transaction (one bridge hop). While a batch is
committing, the next one collects, so batches grow with load by themselves
("natural" group commit); ``batch.max_delay_ms`` > 0 (default 0) also waits
that long after the first item for a batch to fill, which measured slower
here at every load (docs/benchmarks.md). Cursor updates are coalesced per
(user, conv, field): the highest seq wins.

Before the commit, ``prepare(rows)`` (when set) checks the batch's rows in
order against the state the previous batches committed (group membership,
recalls) and returns those to commit; it answers the refused ones itself.
After the commit, ``on_commit(result)`` is called *synchronously*, with no
checkpoint between batches, so replies and pushes leave in commit (= seq)
order. If the commit fails, ``on_failure(rows, cursors)`` answers every item
``unavailable``; seqs were given back by the storage layer, so the next batch
has no gap. The writer then waits ``batch.retry_backoff`` and goes on: when
PostgreSQL returns, sends succeed again without a restart.

Shutdown: :meth:`close` stops accepting; :meth:`run` flushes what is queued
(shielded, bounded by ``batch.commit_timeout``) and returns.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..histogram import BATCH_ROWS_BOUNDS, COMMIT_SECONDS_BOUNDS, Histogram
from .db import Storage
from .errors import StorageError, StorageUnavailable
from .records import BatchResult, CursorUpdate, SendRow

log = logging.getLogger("imserver.writer")


class BatchWriter:
    """Group-commit writer for one storage (writer 0 in v1)."""

    def __init__(
        self,
        storage: Storage,
        *,
        max_rows: int = 512,
        max_delay: float = 0.002,
        max_queue: int = 16384,
        commit_timeout: float = 5.0,
        retry_backoff: float = 0.5,
        on_commit: Callable[[BatchResult], None] | None = None,
        on_failure: Callable[[list[SendRow], list[CursorUpdate], Exception], None] | None = None,
        now_ms: Callable[[], int] | None = None,
        prepare: Callable[[list[SendRow]], Awaitable[list[SendRow]]] | None = None,
    ) -> None:
        self.prepare = prepare
        self.now_ms = now_ms
        self.storage = storage
        self.max_rows = max_rows
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.commit_timeout = commit_timeout
        self.retry_backoff = retry_backoff
        self.on_commit = on_commit or (lambda r: None)
        self.on_failure = on_failure or (lambda rows, cursors, e: None)
        self._rows: list[SendRow] = []
        self._cursors: dict[tuple[str, str, str], CursorUpdate] = {}
        self._wakeup = trio.Event()
        self._closed = False
        self._idle = trio.Event()
        self._idle.set()
        self._finished = trio.Event()
        # Statistics (metrics read these).
        self.batches = 0
        self.committed_rows = 0
        self.failed_batches = 0
        self.last_batch_rows = 0
        self.last_commit_s = 0.0
        self.batch_rows = Histogram(BATCH_ROWS_BOUNDS)
        self.commit_seconds = Histogram(COMMIT_SECONDS_BOUNDS)

    def __repr__(self) -> str:
        return f"<BatchWriter queued={self.queued} closed={self._closed}>"

    @property
    def queued(self) -> int:
        """Items waiting for the next batch."""
        return len(self._rows) + len(self._cursors)

    def _check_room(self) -> None:
        if self._closed:
            raise StorageUnavailable("server is shutting down")
        if self.queued >= self.max_queue:
            raise StorageUnavailable("write queue full")

    def submit_send(self, row: SendRow) -> None:
        """Queue a message for the next batch.

        Raises:
            StorageUnavailable: the queue is full or the writer is closing.
        """
        self._check_room()
        self._rows.append(row)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    def submit_cursor(self, user: str, conv: str, field: str, seq: int, ref: Any = None) -> None:
        """Queue a cursor move; coalesced with others for the same key.

        Raises:
            StorageUnavailable: the queue is full or the writer is closing.
        """
        key = (user, conv, field)
        cur = self._cursors.get(key)
        if cur is None:
            self._check_room()
            cur = self._cursors[key] = CursorUpdate(user, conv, field, seq)
        elif seq > cur.seq:
            cur.seq = seq
        if ref is not None:
            cur.refs.append(ref)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    def close(self) -> None:
        """Stop accepting new items; :meth:`run` flushes the rest and returns."""
        self._closed = True
        self._wakeup.set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has flushed everything after :meth:`close`."""
        await self._finished.wait()

    async def wait_idle(self) -> None:
        """Wait until everything submitted so far has been committed or failed."""
        await self._idle.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop. Returns after :meth:`close` once the queue is flushed."""
        task_status.started()
        try:
            await self._loop()
        finally:
            self._finished.set()

    async def _loop(self) -> None:
        while True:
            if not self._rows and not self._cursors:
                self._idle.set()
                if self._closed:
                    return
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            if len(self._rows) < self.max_rows and not self._closed and self.max_delay > 0:
                # Let the batch fill for up to max_delay after its first item.
                with trio.move_on_after(self.max_delay):
                    while len(self._rows) < self.max_rows and not self._closed:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
            rows = self._rows[: self.max_rows]
            del self._rows[: self.max_rows]
            cursors = list(self._cursors.values())
            self._cursors.clear()
            await self._flush(rows, cursors)

    async def _flush(self, rows: list[SendRow], cursors: list[CursorUpdate]) -> None:
        start = trio.current_time()
        result: BatchResult | None = None
        error: Exception | None = None
        # A started commit always finishes or fails whole: shielded here, and
        # bounded by commit_timeout on the asyncio side (on the real clock).
        with trio.CancelScope(shield=True):
            try:
                if rows and self.prepare is not None:
                    rows = await self.prepare(rows)
                    if not rows and not cursors:
                        return
                now = self.now_ms() if self.now_ms is not None else None
                result = await self.storage.commit_batch(
                    rows, cursors, now, timeout=self.commit_timeout
                )
            except StorageError as e:
                error = e
        self.last_commit_s = trio.current_time() - start
        log.debug(
            "batch rows=%d cursors=%d commit_ms=%.2f ok=%s",
            len(rows),
            len(cursors),
            self.last_commit_s * 1000,
            result is not None,
        )
        if result is not None:
            self.batch_rows.observe(len(rows))
            self.commit_seconds.observe(self.last_commit_s)
            self.batches += 1
            self.committed_rows += len(rows)
            self.last_batch_rows = len(rows)
            self.on_commit(result)
            return
        assert error is not None
        self.failed_batches += 1
        log.warning("batch_failed rows=%d cursors=%d error=%s", len(rows), len(cursors), error)
        self.on_failure(rows, cursors, error)
        if self.retry_backoff > 0 and not self._closed:
            await trio.sleep(self.retry_backoff)


__all__ = ["BatchWriter"]
