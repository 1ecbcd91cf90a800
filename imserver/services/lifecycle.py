"""The life of a message after it is sent: recall, delete, pin and mute (PROTOCOL §7).

- ``recall`` is an entry of the conversation: it takes the next ``seq`` (a
  ``msg`` of kind ``recall`` with ``meta: {"mid": MID}``) and erases the
  recalled message's body and meta in the same transaction. The handler's
  check is repeated in commit order by
  :meth:`~imserver.services.groups.GroupService.prepare`, so two recalls of one
  message cannot both pass.
- ``delete`` hides one message for the requesting user only.
- ``conv_set`` sets pinned/muted of the user's own conversation entry.

``delete`` and ``conv_set`` take no ``seq``: they commit directly, then the
user's other devices get ``deleted`` / ``conv`` pushes (docs/protocol.md §11).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ErrorCode, OpError

from ..storage.records import SendRow
from ..transport.base import Payload
from .chat import direct_peer
from .groups import RecallRequest, check_recall, group_of

if TYPE_CHECKING:
    from ..session import Session
    from ..state import ServerState

log = logging.getLogger("imserver.lifecycle")


class LifecycleService:
    """recall, delete, conv_set."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def recall(self, session: Session, f: dict[str, Any]) -> None:
        """Check a recall and queue its entry; the reply comes after the commit."""
        state = self.state
        user = session.user
        mid = f["mid"]
        st = (await state.storage.message_states([mid])).get(mid)
        check_recall(st, user, state.clock.now_ms(), state.cfg.chat.recall_window_s)
        assert st is not None
        conv = st["conv"]
        gid = group_of(conv)
        if gid is not None:
            await state.groups.check_send(session, gid, None)
            members: tuple[str, ...] = ()
        else:
            peer = direct_peer(conv, user)
            members = (user, peer) if user < peer else (peer, user)
        wait = state.hub.rate("send", user, trio.current_time())
        if wait:
            raise OpError(ErrorCode.RATE_LIMITED, "send rate exceeded", retry_after=round(wait, 3))
        row = SendRow(
            sender=user,
            cid=None,
            conv=conv,
            conv_kind="group" if gid is not None else "direct",
            kind="recall",
            body="",
            meta={"mid": mid},
            mentions=None,
            reply_to=None,
            members=members,
            ref=(session, f.get("rid")),
            action=RecallRequest(mid),
        )
        await state.groups.submit(session, row)

    def committed(self, row: SendRow) -> None:
        """Push ``recalled`` to every online device of the conversation but the requester's."""
        req: RecallRequest = row.action
        origin = row.ref[0] if row.ref is not None else None
        frame = {
            "op": "recalled",
            "conv": row.conv,
            "mid": req.mid,
            "seq": req.seq,
            "by": row.sender,
        }
        self.state.hub.publish(row.members, Payload(frame), exclude=origin)

    async def delete(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """Hide a message for this user; their other devices get ``deleted``."""
        mid = f["mid"]
        found = await self.state.storage.hide_message(session.user, mid)
        if found is None:
            raise OpError(ErrorCode.NOT_FOUND, "no such message")
        self.state.hub.publish(
            (session.user,),
            Payload({"op": "deleted", "conv": found["conv"], "mid": mid}),
            exclude=session,
        )
        return {}

    async def conv_set(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """Set pinned/muted; the user's other devices get ``conv``."""
        conv = f["conv"]
        got = await self.state.storage.conv_set(session.user, conv, f.get("pinned"), f.get("muted"))
        if got is None:
            raise OpError(ErrorCode.NOT_FOUND, "no such conversation")
        frame = {"conv": conv, "pinned": got["pinned"], "muted": got["muted"]}
        self.state.hub.publish((session.user,), Payload({"op": "conv", **frame}), exclude=session)
        return frame
