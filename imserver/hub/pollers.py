"""Long-poll waiters: HTTP requests parked until a message for their user commits.

Node-local, like the sockets they stand for. A waiter registers *before* its
request reads PostgreSQL, so a commit that lands between that read and the
wait still wakes it (the wake-up is an event, not a message: the request reads
again). :meth:`PollWaiters.notify` runs in the writer task after each commit
and never awaits; it costs one truthiness test when nobody polls.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from protocol.errors import ErrorCode, OpError


class PollWaiters:
    """Per-user sets of waiting long-polls: at most ``max_per_user`` each,
    ``max_total`` in all (below ``http.max_requests``, so polls alone cannot
    take every request slot)."""

    def __init__(self, max_per_user: int, max_total: int = 1_000_000) -> None:
        self.max_per_user = max_per_user
        self.max_total = max_total
        self._waiting: dict[str, list[trio.Event]] = {}
        self._total = 0

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __len__(self) -> int:
        return self._total

    def count(self, user: str) -> int:
        """Long-polls of ``user`` waiting now."""
        return len(self._waiting.get(user, ()))

    def register(self, user: str) -> trio.Event:
        """Register one long-poll of ``user``; :meth:`notify` sets the event.

        Every registration must be undone with :meth:`unregister`.

        Raises:
            OpError: rate_limited when ``user`` already has ``max_per_user``
                waiting; unavailable when ``max_total`` polls wait.
        """
        if self._total >= self.max_total:
            raise OpError(ErrorCode.UNAVAILABLE, "too many long-polls waiting", retry_after=1)
        events = self._waiting.setdefault(user, [])
        if len(events) >= self.max_per_user:
            raise OpError(
                ErrorCode.RATE_LIMITED,
                f"at most {self.max_per_user} long-polls of one user may wait at once",
                retry_after=1,
            )
        event = trio.Event()
        events.append(event)
        self._total += 1
        return event

    def unregister(self, user: str, event: trio.Event) -> None:
        """Undo one :meth:`register`."""
        events = self._waiting.get(user)
        if events is not None:
            events.remove(event)
            self._total -= 1
            if not events:
                del self._waiting[user]

    def notify(self, users: Iterable[str]) -> None:
        """Wake every long-poll of ``users`` (something committed for them)."""
        waiting = self._waiting
        for user in users:
            events = waiting.get(user)
            if events:
                for event in events:
                    event.set()
