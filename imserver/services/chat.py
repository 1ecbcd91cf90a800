"""Chat: send, sync, history, read/recv cursors, typing; post-commit delivery.

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
from .groups import RecallRequest, group_of
from .roster import GroupChange

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
    """Rules of direct and group chat, and post-commit delivery of every entry."""

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
        gid = f.get("group")
        if gid is None and "conv" in f:
            gid = group_of(f["conv"])
        if gid is not None:
            return await self._send_group(session, f, gid)
        if "to" in f:
            peer = f["to"]
            if peer == user:
                raise OpError(ErrorCode.INVALID, "to: cannot send to yourself")
            conv = direct_conv(user, peer)
        else:
            conv = f["conv"]
            peer = direct_peer(conv, user)
        body, meta = self._check_content(f)
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

    def _check_content(self, f: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        lim = self.state.cfg.limits
        body = f.get("body") or ""
        if len(body) * 4 > lim.max_body_bytes and len(body.encode()) > lim.max_body_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"body: over {lim.max_body_bytes} bytes")
        meta = f.get("meta")
        if meta is not None and len(pack(meta)) > lim.max_meta_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"meta: over {lim.max_meta_bytes} bytes")
        return body, meta

    async def _send_group(self, session: Session, f: dict[str, Any], gid: str) -> None:
        user = session.user
        body, meta = self._check_content(f)
        mentions = f.get("mentions") or None
        if mentions:
            mentions = list(dict.fromkeys(mentions))
        self._rate("send", user)
        try:
            await self.state.groups.check_send(session, gid, mentions)
        except OpError as e:
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
            conv=f"g:{gid}",
            conv_kind="group",
            kind=f.get("kind", "text"),
            body=body,
            meta=meta,
            mentions=mentions,
            reply_to=f.get("reply_to"),
            members=(),  # the roster at commit time (GroupService.prepare)
            ref=(session, f.get("rid")),
        )
        await self.state.groups.submit(session, row)

    # -- post-commit ---------------------------------------------------------

    def on_commit(self, result: BatchResult) -> None:
        """Answer senders and publish pushes of one committed batch, in order.

        Runs synchronously in the writer task: no checkpoint, so nothing
        interleaves with the order of commits. Inside ``Hub.staged()`` every
        connection gets its share of the batch (replies and pushes, in order)
        in one write.
        """
        with self.state.hub.staged():
            self._deliver_batch(result)

    def _deliver_batch(self, result: BatchResult) -> None:
        hub = self.state.hub
        stats = self.state.stats
        groups = self.state.groups
        for row in result.rows:
            session, rid = row.ref if row.ref is not None else (None, None)
            if session is not None:
                session.release_inflight()
            action = row.action
            if session is not None and rid is not None:
                reply = {
                    "op": "ok",
                    "rid": rid,
                    "mid": row.mid,
                    "conv": row.conv,
                    "seq": row.seq,
                    "ts": row.ts,
                }
                if isinstance(action, GroupChange):
                    reply.update(groups.reply_fields(row))
                session.reply(reply)
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
            # One Payload for every other member: encoded once per encoding.
            payload = Payload(msg)
            n = hub.publish(row.members, payload, skip=row.sender)
            entry = hub.entry(row.sender)
            if entry is not None and (len(entry.devices) > 1 or session is None):
                if row.cid is not None:
                    payload = Payload({**msg, "cid": row.cid})
                n += hub.publish((row.sender,), payload, exclude=session)
            stats.messages_delivered += n
            if hub.pollers:
                hub.pollers.notify(row.members)
            if isinstance(action, GroupChange):
                groups.committed(row)
            elif isinstance(action, RecallRequest):
                self.state.lifecycle.committed(row)
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
        if cur.field == "read":
            hub.publish(
                (cur.user,),
                Payload({"op": "read", "conv": cur.conv, "seq": cur.seq}),
                exclude=origin,
            )
        if not cur.conv.startswith("d:"):
            return  # receipts are for direct conversations only (PROTOCOL §7)
        try:
            peer = direct_peer(cur.conv, cur.user)
        except OpError:
            return
        if cur.field == "read":
            receipt = {"op": "receipt", "conv": cur.conv, "user": cur.user, "read": cur.seq}
        else:
            receipt = {"op": "receipt", "conv": cur.conv, "user": cur.user, "delivered": cur.seq}
        hub.publish((peer,), Payload(receipt))

    def on_failure(
        self, rows: list[SendRow], cursors: list[CursorUpdate], error: Exception
    ) -> None:
        """Answer every item of a failed batch ``unavailable`` (nothing was accepted)."""
        err = OpError(ErrorCode.UNAVAILABLE, "storage unavailable, retry later")
        # The outcome may be unknown (a commit that timed out may still have
        # landed): reload the rosters the batch changed from PostgreSQL.
        self.state.groups.forget(
            row.conv[2:] for row in rows if isinstance(row.action, GroupChange)
        )
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
        gid = group_of(conv)
        wechat = conv.startswith("wx:")
        if wechat:
            self._check_wechat_owner(session.user, conv)
        elif gid is None:
            direct_peer(conv, session.user)
        got = await self.state.storage.history(
            session.user,
            conv,
            f.get("after_seq"),
            f.get("before_seq"),
            f.get("limit", 50),
            member_only=gid is not None or wechat,
        )
        if got is None:
            if wechat:
                return {"msgs": [], "more": False}  # an owner, before its first message
            assert gid is not None
            if await self.state.groups.roster(gid) is None:
                raise OpError(ErrorCode.NOT_FOUND, "no such group")
            raise OpError(ErrorCode.FORBIDDEN, "not a member of this group")
        msgs, more = got
        return {"msgs": msgs, "more": more}

    def _check_wechat_owner(self, user: str, conv: str) -> None:
        if not self.state.wechat.may_read(user, conv):
            raise OpError(ErrorCode.FORBIDDEN, "not an owner of this WeChat account")

    async def cursor(self, session: Session, f: dict[str, Any], field: str) -> None:
        """``read`` or ``recv``: queue the cursor; the reply comes after the commit."""
        conv = f["conv"]
        gid = group_of(conv)
        if conv.startswith("wx:"):
            self._check_wechat_owner(session.user, conv)
        elif gid is None:
            direct_peer(conv, session.user)
        else:
            cached = self.state.groups.cache.get(gid)
            # A former member may still move their cursor: the commit updates
            # only the user's own row, clamped to the entry that removed them.
            if (cached is None or session.user not in cached.members) and (
                await self.state.groups.roster(gid) is None
            ):
                raise OpError(ErrorCode.NOT_FOUND, "no such group")
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
            self._rate("typing", session.user)
            r = await self.state.groups.check_send(session, f["group"], None)
            self.state.hub.publish(
                r.member_tuple(),
                Payload({"op": "typing", "conv": r.conv, "user": session.user, "on": f["on"]}),
                skip=session.user,
            )
            return
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
