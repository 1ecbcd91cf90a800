"""Storage-layer errors: the only exceptions that leave ``imserver.storage``.

asyncpg and asyncio exceptions are translated here once (STYLE practice 11), so
the rest of the server never sees a database driver type.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of storage errors."""


class StorageUnavailable(StorageError):
    """PostgreSQL is down, unreachable, too slow, or the writer queue is full.

    Nothing of the request was accepted; the client may retry later.
    """


class StorageConflict(StorageError):
    """A constraint made the change impossible (for example a duplicate name)."""
