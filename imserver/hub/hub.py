"""The hub: who is online where, presence, rate limits, and routing of pushes.

Theory of operation
-------------------
The hub is split into shards by user (``hash(user) % shards``: Python caches a
string's hash on the object, so a fan-out to the member names of a roster pays
no hashing; the mapping only has to hold within this process). A shard owns,
for its users, the device registry (which connection serves which device),
presence, the rate-limit buckets, and a heartbeat sweep task. Shard methods
never ``await``: a check and the update it guards happen in one Trio step, so
no lock is needed (STYLE practice 10). Methods return what the caller must do
(connections to kick), and the caller does the I/O afterwards.

Every push to users goes through :meth:`Hub.publish` with plain data (a
:class:`~imserver.transport.base.Payload`): "deliver this to the devices of
these users". That single call is the seam where a later multi-process step can
carry pushes between nodes over a broker (SCALE-OUT point 1). Delivery to a
connection is ``send_nowait`` onto its bounded queue; a full queue kicks that
connection with ``slow_consumer``, so one slow device never stalls a fan-out.

Node-local state (connections, heartbeats, queues) lives in ``UserEntry.devices``;
what would be cluster-wide later (device registry, presence, rate-limit share)
is reached only through shard methods (SCALE-OUT point 5).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Protocol

import trio

from protocol.errors import KickReason

from ..storage.records import Relations
from ..transport.base import Payload
from .pollers import PollWaiters
from .ratelimit import RateLimiter

log = logging.getLogger("imserver.hub")

_conn_ids = itertools.count(1)


def next_conn_id(node_id: int, incarnation: int) -> str:
    """A connection id unique across nodes and restarts (SCALE-OUT point 7)."""
    return f"{node_id}.{incarnation:x}.{next(_conn_ids)}"


class Conn(Protocol):
    """What the hub needs of a session."""

    conn_id: str
    user: str
    device: str
    token_hash: bytes | None
    connected_at: float
    last_rx: float

    def deliver(self, payload: Payload) -> None:
        """Queue a push without blocking (kicks itself when its queue is full)."""

    def kick(self, reason: KickReason) -> None:
        """End the connection with ``{"op":"kicked","reason":...}``."""

    def flush_staged(self) -> None:
        """Send or queue what was staged during :meth:`Hub.staged` in one write."""


class UserEntry:
    """One online user's devices, presence and cached relations."""

    __slots__ = ("devices", "relations", "status")

    def __init__(self, relations: Relations) -> None:
        self.devices: dict[str, Conn] = {}
        self.status = "online"
        self.relations = relations


class HubShard:
    """The users of one shard. No method awaits."""

    def __init__(self, index: int, limiter: RateLimiter, max_devices: int) -> None:
        self.index = index
        self.users: dict[str, UserEntry] = {}
        self.last_seen: dict[str, int] = {}
        self.limiter = limiter
        self.max_devices = max_devices

    def __repr__(self) -> str:
        return f"<HubShard {self.index} users={len(self.users)}>"

    def attach(
        self, conn: Conn, relations: Relations
    ) -> tuple[list[tuple[Conn, KickReason]], bool]:
        """Register ``conn`` for its (user, device).

        Returns the connections to kick (replaced device, oldest device beyond
        ``max_devices``) and whether the user just came online.
        """
        entry = self.users.get(conn.user)
        came_online = entry is None
        if entry is None:
            entry = self.users[conn.user] = UserEntry(relations)
        kicks: list[tuple[Conn, KickReason]] = []
        old = entry.devices.pop(conn.device, None)
        if old is not None:
            kicks.append((old, KickReason.REPLACED))
        while len(entry.devices) >= self.max_devices:
            oldest = next(iter(entry.devices))
            kicks.append((entry.devices.pop(oldest), KickReason.TOO_MANY_DEVICES))
        entry.devices[conn.device] = conn
        return kicks, came_online

    def detach(self, conn: Conn, now_ms: int) -> bool:
        """Forget ``conn`` if it is still registered; True if its user went offline."""
        entry = self.users.get(conn.user)
        if entry is None or entry.devices.get(conn.device) is not conn:
            return False
        del entry.devices[conn.device]
        if entry.devices:
            return False
        del self.users[conn.user]
        self.last_seen[conn.user] = now_ms
        if len(self.last_seen) > 100_000:
            # Bounded: forget the oldest half (dicts keep insertion order).
            for user in list(itertools.islice(self.last_seen, 50_000)):
                del self.last_seen[user]
        return True

    def idle(self, now: float, timeout: float) -> list[Conn]:
        """Connections from which nothing arrived for ``timeout`` seconds."""
        limit = now - timeout
        return [c for e in self.users.values() for c in e.devices.values() if c.last_rx < limit]


class Hub:
    """All shards, plus the routing call every push goes through."""

    def __init__(
        self,
        *,
        shards: int,
        max_devices: int,
        heartbeat_timeout: float,
        sweep_interval: float,
        limits: dict[str, tuple[float, float]],
        max_pollers_per_user: int = 4,
        max_pollers: int = 1_000_000,
    ) -> None:
        #: HTTP long-polls waiting for a commit (node-local).
        self.pollers = PollWaiters(max_pollers_per_user, max_pollers)
        self.shards = [HubShard(i, RateLimiter(limits), max_devices) for i in range(shards)]
        self.heartbeat_timeout = heartbeat_timeout
        self.sweep_interval = sweep_interval
        self.pushes = 0
        #: While not None (inside :meth:`staged`), connections collect what
        #: they are given and are listed here, to write it all at the end.
        self.staging: list[Conn] | None = None

    def shard(self, user: str) -> HubShard:
        """The shard that owns ``user``."""
        return self.shards[hash(user) % len(self.shards)]

    def entry(self, user: str) -> UserEntry | None:
        """The online entry of ``user``, or None when offline."""
        return self.shard(user).users.get(user)

    def devices(self, user: str) -> list[Conn]:
        """The connections of ``user``'s online devices."""
        e = self.shard(user).users.get(user)
        return list(e.devices.values()) if e is not None else []

    def publish(
        self,
        users: Iterable[str],
        payload: Payload,
        exclude: Conn | None = None,
        skip: str | None = None,
    ) -> int:
        """Deliver ``payload`` to every online device of ``users`` but ``exclude``.

        ``skip`` names a user to leave out (the sender of a group message,
        without building a second member list per message). Returns the
        number of connections it was queued for.
        """
        n = 0
        shards = self.shards
        nshards = len(shards)
        for user in users:
            if user == skip:
                continue
            e = shards[hash(user) % nshards].users.get(user)
            if e is None:
                continue
            for c in e.devices.values():
                if c is not exclude:
                    c.deliver(payload)
                    n += 1
        self.pushes += n
        return n

    @contextlib.contextmanager
    def staged(self) -> Iterator[None]:
        """Collect every delivery made inside, then write each connection's share at once.

        The batch writer wraps the post-commit pushes of a batch in it: a
        connection that gets k frames from one batch (its replies, the
        messages of several conversations, a fan-out) costs one write, not
        k, and order per connection is kept because nothing is written
        before the end. Deliveries never await, so nothing interleaves.
        """
        if self.staging is not None:
            yield
            return
        staging: list[Conn] = []
        self.staging = staging
        try:
            yield
        finally:
            self.staging = None
            for conn in staging:
                conn.flush_staged()

    def rate(self, kind: str, user: str, now: float, n: float = 1.0) -> float:
        """Take from ``user``'s ``kind`` bucket: 0.0, or seconds to wait."""
        return self.shard(user).limiter.take(kind, user, now, n)

    def all_conns(self) -> list[Conn]:
        """Every registered connection."""
        return [c for s in self.shards for e in s.users.values() for c in e.devices.values()]

    def online_users(self) -> list[str]:
        """Every online user."""
        return [u for s in self.shards for u in s.users]

    def online_count(self) -> int:
        """Number of online users."""
        return sum(len(s.users) for s in self.shards)

    def rejections(self) -> dict[str, int]:
        """Rate-limit rejections by kind, over all shards."""
        total: dict[str, int] = {}
        for s in self.shards:
            for k, v in s.limiter.rejections.items():
                total[k] = total.get(k, 0) + v
        return total

    async def run_sweeps(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """One heartbeat sweep task per shard, until cancelled."""
        async with trio.open_nursery() as nursery:
            for s in self.shards:
                nursery.start_soon(self._sweep, s)
            task_status.started()

    async def _sweep(self, shard: HubShard) -> None:
        while True:
            await trio.sleep(self.sweep_interval)
            now = trio.current_time()
            for conn in shard.idle(now, self.heartbeat_timeout):
                log.info("heartbeat_timeout conn=%s user=%s", conn.conn_id, conn.user)
                conn.kick(KickReason.TIMEOUT)
            shard.limiter.prune(now)
