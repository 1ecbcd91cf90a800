"""Notices: system notifications kept until read (PROTOCOL §8).

Created by an operator (the HTTP admin API calls :meth:`NoticeService.create`),
stored, then pushed as ``{"op":"notice",...}`` to the online devices of the
users it names, or of everyone. ``notices`` lists a user's unread ones and
``notice_read`` marks one read.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, OpError

from ..transport.base import Payload

if TYPE_CHECKING:
    from ..session import Session
    from ..state import ServerState

log = logging.getLogger("imserver.notices")

MAX_KIND_CHARS = 32
MAX_TITLE_CHARS = 256


class NoticeService:
    """Create, list and mark notices."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(
        self, kind: str, title: str, body: str, users: list[str] | None = None
    ) -> dict[str, Any]:
        """Store a notice for ``users`` (None: every user) and push it to those online.

        Returns the ``notice`` frame's fields (``id``, ``kind``, ``title``,
        ``body``, ``ts``).

        Raises:
            OpError: invalid (empty or over-long fields), too_large (body or
                user list over its limit), not_found (unknown users; nothing
                is stored).
        """
        lim = self.state.cfg.limits
        if not kind or len(kind) > MAX_KIND_CHARS:
            raise OpError(ErrorCode.INVALID, f"kind: 1 to {MAX_KIND_CHARS} characters")
        if len(title) > MAX_TITLE_CHARS:
            raise OpError(ErrorCode.INVALID, f"title: at most {MAX_TITLE_CHARS} characters")
        if len(body.encode()) > lim.max_body_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"body: over {lim.max_body_bytes} bytes")
        for name, text in (("kind", kind), ("title", title), ("body", body)):
            if "\x00" in text:  # PostgreSQL's text cannot store it
                raise OpError(ErrorCode.INVALID, f"{name}: must not contain U+0000")
        if users is not None and any("\x00" in u for u in users):
            raise OpError(ErrorCode.INVALID, "users: must not contain U+0000")
        if users is not None:
            users = list(dict.fromkeys(users))
            if not users:
                raise OpError(ErrorCode.INVALID, "users: empty (omit it to notify everyone)")
            if len(users) > lim.max_notice_users:
                raise OpError(ErrorCode.TOO_LARGE, f"users: at most {lim.max_notice_users}")
        now = self.state.clock.now_ms()
        got = await self.state.storage.create_notice(kind, title, body, users, now)
        if isinstance(got, list):
            raise OpError(ErrorCode.NOT_FOUND, f"no such user: {', '.join(got[:10])}")
        notice = {"id": got, "kind": kind, "title": title, "body": body, "ts": now}
        hub = self.state.hub
        targets = users if users is not None else hub.online_users()
        n = hub.publish(targets, Payload({"op": "notice", **notice}))
        audience = "all" if users is None else len(users)
        log.info("notice_created id=%d users=%s pushed=%d", got, audience, n)
        return notice

    async def unread(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """notices: the user's unread notices, newest first."""
        limit = self.state.cfg.limits.max_notices
        return {"notices": await self.state.storage.unread_notices(session.user, limit)}

    async def read(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """notice_read: mark one notice read (idempotent)."""
        ok = await self.state.storage.read_notice(session.user, f["id"], self.state.clock.now_ms())
        if not ok:
            raise OpError(ErrorCode.NOT_FOUND, "no such notice")
        return {}
