"""Direct chat: send, sync, history, read/recv cursors, typing.

The path of one ``send`` (STYLE "the path of one send"): the session validated
the frame; :meth:`ChatService.send` checks the rules (conversation, limits,
friendship, blocks, rate) and hands a :class:`SendRow` to the batch writer.
After the batch commits, :meth:`ChatService.on_commit` answers the sender and
publishes the ``msg`` pushes through the hub, in seq order, without awaiting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.codec import pack
from protocol.errors import ErrorCode, OpError

from ..storage.errors import StorageError, StorageUnavailable
from ..storage.records import BatchResult, CursorUpdate, SendRow
from ..transport.base import Payload
from .auth import USER_RE

if TYPE_CHECKING:
    from ..session import Session
    from ..state import ServerState

log = logging.getLogger("imserver.chat")


def direct_conv(a: str, b: str) -> str:
    """The id of the direct conversation of ``a`` and ``b`` (PROTOCOL §4)."""
    return f"d:{a}:{b}" if a < b else f"d:{b}:{a}"


def direct_peer(conv: str, user: str) -> str:
    """The other member of a direct conversation that ``user`` belongs to.

    Raises:
        OpError: not_found for a malformed or non-direct id, forbidden if
            ``user`` is not a member.
    """
    parts = conv.split(":")
    if len(parts) != 3 or parts[0] != "d":
        if parts[0] in ("g", "wx"):
            raise OpError(ErrorCode.NOT_FOUND, "no such conversation")
        raise OpError(ErrorCode.INVALID, "conv: not a conversation id")
    _, a, b = parts
    if not (USER_RE.fullmatch(a) and USER_RE.fullmatch(b)) or a >= b:
        raise OpError(ErrorCode.INVALID, "conv: not a conversation id")
    if user == a:
        return b
    if user == b:
        return a
    raise OpError(ErrorCode.FORBIDDEN, "not a member of this conversation")


class ChatService:
    """Rules and post-commit delivery of direct conversations."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._known_users: dict[str, bool] = {}

    # -- checks --------------------------------------------------------------

    def _rate(self, kind: str, user: str) -> None:
        wait = self.state.hub.rate(kind, user, trio.current_time())
        if wait:
            raise OpError(
                ErrorCode.RATE_LIMITED, f"{kind} rate exceeded", retry_after=round(wait, 3)
            )

    async def _check_peer(self, session: Session, peer: str, what: str) -> None:
        """Friendship, blocks and existence of ``peer`` for ``session.user``."""
        rel = session.relations
        if rel.blocked_with(peer):
            raise OpError(ErrorCode.FORBIDDEN, f"{what}: blocked")
        if peer in rel.friends:
            return
        if self.state.cfg.chat.require_friendship:
            raise OpError(ErrorCode.FORBIDDEN, f"{what}: not friends")
        if not await self._user_exists(peer):
            raise OpError(ErrorCode.NOT_FOUND, f"no such user {peer!r}")

    async def _user_exists(self, user: str) -> bool:
        known = self._known_users.get(user)
        if known is None:
            known = await self.state.storage.user_exists(user)
            if len(self._known_users) > 100_000:
                self._known_users.clear()
            if known:
                self._known_users[user] = True
        return known

    # -- send ----------------------------------------------------------------

    async def send(self, session: Session, f: dict[str, Any]) -> None:
        """Check a ``send`` and queue it; the reply comes after the commit."""
        user = session.user
        cfg = self.state.cfg
        if "group" in f:
            raise OpError(ErrorCode.NOT_FOUND, "no such group")
        if "to" in f:
            peer = f["to"]
            if peer == user:
                raise OpError(ErrorCode.INVALID, "to: cannot send to yourself")
            conv = direct_conv(user, peer)
        else:
            conv = f["conv"]
            peer = direct_peer(conv, user)
        body = f.get("body") or ""
        if (
            len(body) * 4 > cfg.limits.max_body_bytes
            and len(body.encode()) > cfg.limits.max_body_bytes
        ):
            raise OpError(ErrorCode.TOO_LARGE, f"body: over {cfg.limits.max_body_bytes} bytes")
        meta = f.get("meta")
        if meta is not None and len(pack(meta)) > cfg.limits.max_meta_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"meta: over {cfg.limits.max_meta_bytes} bytes")
        if f.get("mentions"):
            raise OpError(ErrorCode.INVALID, "mentions: only in groups")
        self._rate("send", user)
        try:
            await self._check_peer(session, peer, "send")
        except OpError as e:
            # A repeat of an already stored cid answers like the first send,
            # whatever changed since (PROTOCOL §5): look it up only on refusal
            # (which the rate limit above bounds).
            first = await self.state.storage.find_sent(user, f["cid"])
            if first is None:
                raise
            rid = f.get("rid")
            if rid is not None:
                await session.respond({"op": "ok", "rid": rid, **first})
            log.debug("repeat_after_refusal user=%s code=%s", user, e.code)
            return
        row = SendRow(
            sender=user,
            cid=f["cid"],
            conv=conv,
            conv_kind="direct",
            kind=f.get("kind", "text"),
            body=body,
            meta=meta,
            mentions=None,
            reply_to=f.get("reply_to"),
            members=(user, peer) if user < peer else (peer, user),
            ref=(session, f.get("rid")),
        )
        await session.acquire_inflight()
        try:
            self.state.writer.submit_send(row)
        except StorageUnavailable as e:
            session.release_inflight()
            raise OpError(ErrorCode.UNAVAILABLE, str(e)) from None

    # -- post-commit ---------------------------------------------------------

    def on_commit(self, result: BatchResult) -> None:
        """Answer senders and publish pushes of one committed batch, in order.

        Runs synchronously in the writer task: no checkpoint, so nothing
        interleaves with the order of commits.
        """
        hub = self.state.hub
        stats = self.state.stats
        for row in result.rows:
            session, rid = row.ref if row.ref is not None else (None, None)
            if session is not None:
                session.release_inflight()
            if session is not None and rid is not None:
                session.reply(
                    {
                        "op": "ok",
                        "rid": rid,
                        "mid": row.mid,
                        "conv": row.conv,
                        "seq": row.seq,
                        "ts": row.ts,
                    }
                )
            if row.repeat:
                continue
            stats.messages_accepted += 1
            msg: dict[str, Any] = {
                "op": "msg",
                "mid": row.mid,
                "conv": row.conv,
                "seq": row.seq,
                "from": row.sender,
                "kind": row.kind,
                "body": row.body if row.body is not None else "",
                "ts": row.ts,
            }
            if row.meta is not None:
                msg["meta"] = row.meta
            if row.mentions:
                msg["mentions"] = row.mentions
            if row.reply_to is not None:
                msg["reply_to"] = row.reply_to
            others = [m for m in row.members if m != row.sender]
            n = hub.publish(others, Payload(msg))
            if row.cid is not None:
                entry = hub.entry(row.sender)
                if entry is not None and (len(entry.devices) > 1 or session is None):
                    own = dict(msg)
                    own["cid"] = row.cid
                    n += hub.publish((row.sender,), Payload(own), exclude=session)
            stats.messages_delivered += n
        for cur in result.cursors:
            self._cursor_committed(cur)

    def _cursor_committed(self, cur: CursorUpdate) -> None:
        hub = self.state.hub
        for session, rid in cur.refs:
            session.release_inflight()
            if rid is not None:
                session.reply({"op": "ok", "rid": rid})
        if not cur.changed:
            return
        origin = cur.refs[-1][0] if cur.refs else None
        try:
            peer = direct_peer(cur.conv, cur.user)
        except OpError:
            return
        if cur.field == "read":
            hub.publish(
                (cur.user,),
                Payload({"op": "read", "conv": cur.conv, "seq": cur.seq}),
                exclude=origin,
            )
            receipt = {"op": "receipt", "conv": cur.conv, "user": cur.user, "read": cur.seq}
        else:
            receipt = {"op": "receipt", "conv": cur.conv, "user": cur.user, "delivered": cur.seq}
        hub.publish((peer,), Payload(receipt))

    def on_failure(
        self, rows: list[SendRow], cursors: list[CursorUpdate], error: Exception
    ) -> None:
        """Answer every item of a failed batch ``unavailable`` (nothing was accepted)."""
        err = OpError(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")
        for row in rows:
            if row.ref is not None:
                session, rid = row.ref
                session.release_inflight()
                session.reply(err.to_frame(rid))
        for cur in cursors:
            for session, rid in cur.refs:
                session.release_inflight()
                session.reply(err.to_frame(rid))

    # -- reading and cursors -------------------------------------------------

    async def sync(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """The user's conversations (PROTOCOL §6)."""
        lim = self.state.cfg.limits
        convs = await self.state.storage.sync(
            session.user, lim.sync_max_convs, lim.unread_count_cap
        )
        return {"convs": convs}

    async def history(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """A page of one conversation (PROTOCOL §6)."""
        conv = f["conv"]
        direct_peer(conv, session.user)
        msgs, more = await self.state.storage.history(
            session.user, conv, f.get("after_seq"), f.get("before_seq"), f.get("limit", 50)
        )
        return {"msgs": msgs, "more": more}

    async def cursor(self, session: Session, f: dict[str, Any], field: str) -> None:
        """``read`` or ``recv``: queue the cursor; the reply comes after the commit."""
        conv = f["conv"]
        direct_peer(conv, session.user)
        self._rate("receipts", session.user)
        await session.acquire_inflight()
        try:
            self.state.writer.submit_cursor(
                session.user, conv, field, f["seq"], ref=(session, f.get("rid"))
            )
        except StorageUnavailable as e:
            session.release_inflight()
            raise OpError(ErrorCode.UNAVAILABLE, str(e)) from None

    async def typing(self, session: Session, f: dict[str, Any]) -> None:
        """Relay a typing notice to the peer's devices (not stored)."""
        if "group" in f:
            raise OpError(ErrorCode.NOT_FOUND, "no such group")
        peer = f["to"]
        if peer == session.user:
            raise OpError(ErrorCode.INVALID, "to: cannot type to yourself")
        self._rate("typing", session.user)
        await self._check_peer(session, peer, "typing")
        conv = direct_conv(session.user, peer)
        self.state.hub.publish(
            (peer,), Payload({"op": "typing", "conv": conv, "user": session.user, "on": f["on"]})
        )


__all__ = ["ChatService", "StorageError", "direct_conv", "direct_peer"]
