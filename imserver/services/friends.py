"""Friends, blocks and presence (PROTOCOL §8).

Friend operations commit in PostgreSQL first; the cached :class:`Relations` of
online users are then updated from the committed outcome (SCALE-OUT point 9),
and the other side gets a ``friend`` push. Presence is in-memory hub state:
accepted friends that neither side blocks get a ``presence`` push on every
change.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ErrorCode, OpError

from ..transport.base import Payload

if TYPE_CHECKING:
    from ..session import Session
    from ..state import ServerState

log = logging.getLogger("imserver.friends")

_OUTCOME_ERRORS = {
    "not_found": (ErrorCode.NOT_FOUND, "no such user or request"),
    "conflict": (ErrorCode.CONFLICT, "already friends"),
    "forbidden": (ErrorCode.FORBIDDEN, "blocked"),
    "invalid": (ErrorCode.INVALID, "user: cannot be yourself"),
}

_EVENT_OF = {
    "requested": "request",
    "accepted": "accepted",
    "rejected": "rejected",
    "removed": "removed",
}


class FriendService:
    """Friend requests, blocks, and presence."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def op(self, session: Session, f: dict[str, Any]) -> dict[str, Any] | None:
        """friend_request / friend_accept / friend_reject / friend_remove / block / unblock."""
        op = f["op"]
        user = session.user
        other = f["to"] if op == "friend_request" else f["user"]
        if op == "friend_request":
            wait = self.state.hub.rate("friend_requests", user, trio.current_time())
            if wait:
                raise OpError(
                    ErrorCode.RATE_LIMITED, "too many friend requests", retry_after=round(wait, 3)
                )
        outcome = await self.state.storage.friend_op(op, user, other, f.get("note", ""))
        if outcome in _OUTCOME_ERRORS:
            code, message = _OUTCOME_ERRORS[outcome]
            raise OpError(code, message)
        log.info("friend_%s user=%s other=%s", outcome, user, other)
        await self._refresh(user, other)
        event = _EVENT_OF.get(outcome)
        if event is not None:
            push: dict[str, Any] = {"op": "friend", "event": event, "user": user}
            if event == "request":
                push["note"] = f.get("note", "")
            self.state.hub.publish((other,), Payload(push))
        if outcome in ("accepted", "removed", "blocked", "unblocked"):
            self._presence_between(user, other)
        return {"result": outcome}

    async def _refresh(self, *users: str) -> None:
        """Reload the committed relations of online users (SCALE-OUT point 9)."""
        for u in users:
            entry = self.state.hub.entry(u)
            if entry is not None:
                entry.relations = await self.state.storage.relations(u)
                for conn in entry.devices.values():
                    conn.relations = entry.relations  # type: ignore[attr-defined]

    def _visible(self, a: str, b: str) -> bool:
        entry = self.state.hub.entry(a)
        if entry is None:
            return False
        rel = entry.relations
        return b in rel.friends and not rel.blocked_with(b)

    def _presence_between(self, a: str, b: str) -> None:
        """After a relation change, tell each side the other's presence if now visible."""
        for x, y in ((a, b), (b, a)):
            if self._visible(y, x):
                self.state.hub.publish((y,), Payload(self.presence_frame(x)))

    def presence_of(self, user: str) -> tuple[str, int | None]:
        """(status, last_seen) of ``user``."""
        hub = self.state.hub
        entry = hub.entry(user)
        if entry is not None:
            return entry.status, None
        return "offline", hub.shard(user).last_seen.get(user)

    def presence_frame(self, user: str) -> dict[str, Any]:
        """The ``presence`` push for ``user``."""
        status, last_seen = self.presence_of(user)
        return {"op": "presence", "user": user, "status": status, "last_seen": last_seen}

    def announce(self, user: str, relations: Any) -> None:
        """Push ``user``'s presence to the online friends who may see it."""
        targets = [f for f in relations.friends if not relations.blocked_with(f)]
        if targets:
            self.state.hub.publish(targets, Payload(self.presence_frame(user)))

    async def set_presence(self, session: Session, f: dict[str, Any]) -> None:
        """``presence``: set away/busy/online and tell friends."""
        entry = self.state.hub.entry(session.user)
        if entry is None:
            return
        if entry.status != f["status"]:
            entry.status = f["status"]
            self.announce(session.user, entry.relations)

    async def presence_query(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """Presence of the accepted, unblocked friends among ``users``."""
        rel = session.relations
        out = []
        for u in dict.fromkeys(f["users"]):
            if u in rel.friends and not rel.blocked_with(u):
                status, last_seen = self.presence_of(u)
                out.append({"user": u, "status": status, "last_seen": last_seen})
        return {"presence": out}

    async def friends(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """Accepted friends, with presence unless a block hides it."""
        rel = session.relations
        out = []
        for u in sorted(rel.friends):
            item: dict[str, Any] = {"user": u}
            if rel.blocked_with(u):
                item["blocked"] = True
            else:
                status, last_seen = self.presence_of(u)
                item["status"] = status
                item["last_seen"] = last_seen
            out.append(item)
        return {"friends": out}

    async def requests(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """Pending requests in both directions."""
        return {"requests": await self.state.storage.friend_requests(session.user)}
