"""The server's clock: wall time derived from Trio's clock.

``ts``, token expiry and ``last_seen`` are wall-clock milliseconds. Deriving
them from ``trio.current_time()`` (plus an offset taken once at start) makes
every time-based rule follow Trio's clock, so tests drive them with
``MockClock`` instead of sleeping.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """Wall-clock milliseconds that advance with ``trio.current_time()``."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        return trio.current_time() + self._offset

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch (the protocol's ``ts``)."""
        return int((trio.current_time() + self._offset) * 1000)
