"""What the application sees: every message once, in ``seq`` order per conversation.

The connection's reader hands everything it receives to
:meth:`Delivery.enqueue` (which never blocks); :meth:`Delivery.run`, one
task, turns it into the application's events. It keeps, per conversation,
the highest ``seq`` delivered (the *cursor*):

* a message at or below the cursor is a duplicate and dropped;
* one above ``cursor + 1`` is a gap, filled with ``history`` first;
* a :class:`Hint` says our own request made an entry (a ``recall`` or a
  group operation, answered to us instead of pushed): fetched the same way;
* a :class:`Resync` (queued at every authentication, and whenever the queue
  overflowed) runs ``sync`` and fills every conversation whose
  ``last_seq`` passed its cursor. The first one sets the baseline: the
  application starts with what was pushed after authentication.

Both queues are bounded (``max_events``). When the application does not
keep up, the reader's queue overflows: messages dropped there come back
with the next resync, other pushes are lost and counted, and a ``resync``
event says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import trio

from .errors import (
    ClientClosed,
    ConnectionLost,
    RateLimited,
    RequestError,
    RequestTimeout,
    Unavailable,
)
from .model import Event, History, Message, Push
from .ops import HISTORY_PAGE

__all__ = ["Delivery", "Hint", "Item", "Resync"]

log = logging.getLogger("clients")


class Resync:
    """Queue item: run ``sync`` and fill every conversation that moved."""


class Hint:
    """Queue item: ``conv`` has an entry at ``seq`` (made by our own request)."""

    __slots__ = ("conv", "seq")

    def __init__(self, conv: str, seq: int) -> None:
        self.conv = conv
        self.seq = seq


Item: TypeAlias = Message | Push | Resync | Hint
SyncFn: TypeAlias = Callable[[], Awaitable[list[dict[str, Any]]]]
HistoryFn: TypeAlias = Callable[[str, int, int], Awaitable[History]]


class Delivery:
    """Orders, deduplicates and completes what reaches the application.

    Args:
        max_events: Bound of the incoming queue and of the event channel.
        cursors: Cursors to start from (conversations the application has).
        sync: Runs a ``sync`` request; returns its ``convs``.
        history: ``history(conv, after_seq, limit)``.
    """

    def __init__(
        self,
        max_events: int,
        cursors: Mapping[str, int] | None,
        *,
        sync: SyncFn,
        history: HistoryFn,
    ) -> None:
        self.cursors: dict[str, int] = dict(cursors or {})
        #: Pushes other than messages dropped because the application lagged.
        self.dropped_pushes = 0
        self._sync = sync
        self._history = history
        self._baselined = False
        self._first_seen: dict[str, int] = {}  # first seq pushed per conv, until baselined
        self._overflow = False
        self._in_send, self._in_recv = trio.open_memory_channel[Item](max_events)
        self._out_send, self.events = trio.open_memory_channel[Event](max_events)

    def enqueue(self, item: Item) -> None:
        """Queue what the reader received (never blocks)."""
        if isinstance(item, Message) and not self._baselined:
            self._first_seen.setdefault(item.conv, item.seq)
        try:
            self._in_send.send_nowait(item)
        except trio.WouldBlock:
            self._overflow = True
            if isinstance(item, Push):
                self.dropped_pushes += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close(self) -> None:
        """End the event stream (the client stopped)."""
        self._out_send.close()

    async def run(self) -> None:
        """Process the queue until the client closes."""
        try:
            async for item in self._in_recv:
                try:
                    await self._handle(item)
                    if self._overflow:
                        self._overflow = False
                        await self._resync(announce=True)
                except (ConnectionLost, RequestTimeout, RequestError) as exc:
                    # Retried with a resync after the next item (and after
                    # every authentication anyway).
                    log.info("catching up interrupted: %r", exc)
                    self._overflow = True
                    if isinstance(exc, RateLimited | Unavailable):
                        await trio.sleep(exc.retry_after or 1.0)
        except (ClientClosed, trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def _handle(self, item: Item) -> None:
        if isinstance(item, Message):
            cur = self.cursors.get(item.conv, 0)
            if item.seq <= cur:
                return
            if item.seq > cur + 1:
                await self._fill(item.conv, cur, item.seq - 1)
            if item.seq > self.cursors.get(item.conv, 0):
                await self._deliver(item)
        elif isinstance(item, Push):
            await self._out_send.send(item)
        elif isinstance(item, Hint):
            cur = self.cursors.get(item.conv, 0)
            if item.seq > cur:
                await self._fill(item.conv, cur, item.seq)
        else:
            await self._resync(announce=False)

    async def _deliver(self, msg: Message) -> None:
        self.cursors[msg.conv] = msg.seq
        await self._out_send.send(msg)

    async def _resync(self, *, announce: bool) -> None:
        for c in await self._sync():
            conv, last = c.get("conv"), c.get("last_seq")
            if not isinstance(conv, str) or not isinstance(last, int):
                continue
            if not self._baselined and conv not in self.cursors:
                # Start after what existed when we authenticated: the sync's
                # last_seq, less what was pushed to us since.
                first = self._first_seen.get(conv)
                base = last if first is None else min(last, first - 1)
                self.cursors[conv] = base
                if last > base:
                    await self._fill(conv, base, last)
                continue
            cur = self.cursors.get(conv, 0)
            if last > cur:
                await self._fill(conv, cur, last)
        self._baselined = True
        self._first_seen.clear()
        if announce:
            await self._out_send.send(
                Push("resync", {"op": "resync", "dropped_pushes": self.dropped_pushes})
            )

    async def _fill(self, conv: str, after: int, upto: int) -> None:
        """Deliver the messages of ``conv`` above ``after`` up to (at least) ``upto``."""
        while after < upto:
            try:
                limit = max(1, min(HISTORY_PAGE, upto - after))
                page = await self._history(conv, after, limit)
            except (RateLimited, Unavailable):
                raise
            except RequestError as exc:
                # Not ours to see (removed from the group, ...): skip the gap.
                log.info("history of %s refused: %s", conv, exc)
                self.cursors[conv] = max(self.cursors.get(conv, 0), upto)
                return
            for m in page.msgs:
                if m.seq > self.cursors.get(conv, 0):
                    await self._deliver(m)
            if not page.msgs or not page.more:
                # Deleted entries never come back; do not ask again.
                self.cursors[conv] = max(self.cursors.get(conv, 0), upto)
                return
            after = page.msgs[-1].seq
