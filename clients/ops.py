"""Typed helpers for the operations of PROTOCOL.md §6-8.

:class:`Operations` is a mixin: each helper builds one request and hands it
to :meth:`Operations.request`, which :class:`clients.client.Client`
implements (matching by ``rid``, timeouts, retries across reconnects).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Final, TypeAlias

from .model import History, Message

__all__ = ["HISTORY_PAGE", "Operations", "Timeout"]

#: The largest ``history`` page the server gives (``limit`` 1-200).
HISTORY_PAGE: Final = 200


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Stands for "the client's default timeout".
DEFAULT: Final = _Default()
#: Seconds, ``DEFAULT``, or ``None`` (no limit).
Timeout: TypeAlias = float | _Default | None
_DEFAULT = DEFAULT


class Operations:
    """Request helpers; the class using it provides :meth:`request`."""

    async def request(
        self, op: str, *, timeout: Timeout = _DEFAULT, **fields: Any
    ) -> dict[str, Any]:
        """Send one request and return its ``ok`` reply (implemented by the client)."""
        raise NotImplementedError

    # ------------------------------------------------------------ catching up (§6)

    async def sync(self, *, timeout: Timeout = _DEFAULT) -> list[dict[str, Any]]:
        """The user's conversations, most recent first (``conv``, ``kind``,
        ``title``, ``last_seq``, ``last_msg``, ``read_seq``, ``unread``,
        ``pinned``, ``muted``, ...)."""
        reply = await self.request("sync", timeout=timeout)
        convs: list[dict[str, Any]] = reply.get("convs", [])
        return convs

    async def history(
        self,
        conv: str,
        *,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> History:
        """One page of a conversation, ascending ``seq`` (PROTOCOL.md §6).

        ``after_seq``: the first ``limit`` entries above it; ``before_seq``:
        the last ``limit`` below it; neither: the last ``limit``.
        """
        reply = await self.request(
            "history",
            conv=conv,
            after_seq=after_seq,
            before_seq=before_seq,
            limit=limit,
            timeout=timeout,
        )
        msgs = [Message.from_frame({"op": "msg", "conv": conv, **m}) for m in reply["msgs"]]
        return History(msgs=msgs, more=bool(reply.get("more")))

    async def history_all(self, conv: str, after_seq: int = 0) -> AsyncIterator[Message]:
        """Every message of ``conv`` above ``after_seq``, page by page."""
        after = after_seq
        while True:
            page = await self.history(conv, after_seq=after, limit=HISTORY_PAGE)
            for m in page.msgs:
                yield m
            if not page.more or not page.msgs:
                return
            after = page.msgs[-1].seq

    # ------------------------------------------------------------ message state (§7)

    async def read(self, conv: str, seq: int, *, timeout: Timeout = _DEFAULT) -> None:
        """Mark everything up to ``seq`` read (cumulative)."""
        await self.request("read", conv=conv, seq=seq, timeout=timeout)

    async def recv(self, conv: str, seq: int, *, timeout: Timeout = _DEFAULT) -> None:
        """Acknowledge delivery up to ``seq`` (cumulative)."""
        await self.request("recv", conv=conv, seq=seq, timeout=timeout)

    async def recall(self, mid: int, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """Take back one of our messages; returns the recall entry's ``mid/conv/seq/ts``."""
        return await self.request("recall", mid=mid, timeout=timeout)

    async def delete(self, mid: int, *, timeout: Timeout = _DEFAULT) -> None:
        """Hide a message for this user only."""
        await self.request("delete", mid=mid, timeout=timeout)

    async def conv_set(
        self,
        conv: str,
        *,
        pinned: bool | None = None,
        muted: bool | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> dict[str, Any]:
        """Pin or mute a conversation; returns ``{"conv", "pinned", "muted"}``."""
        return await self.request(
            "conv_set", conv=conv, pinned=pinned, muted=muted, timeout=timeout
        )

    async def typing(
        self,
        to: str | None = None,
        *,
        group: str | None = None,
        on: bool = True,
        timeout: Timeout = _DEFAULT,
    ) -> None:
        """Tell the peer (or the group) that we are typing (``on``) or stopped."""
        if (to is None) == (group is None):
            raise ValueError("give exactly one of to, group")
        await self.request("typing", to=to, group=group, on=on, timeout=timeout)

    # ------------------------------------------------------------ people (§8)

    async def friend_request(self, to: str, note: str = "", *, timeout: Timeout = _DEFAULT) -> str:
        """Ask ``to`` to be friends; returns ``"requested"`` or ``"accepted"``."""
        reply = await self.request("friend_request", to=to, note=note, timeout=timeout)
        return str(reply.get("result", ""))

    async def friend_accept(self, user: str, *, timeout: Timeout = _DEFAULT) -> str:
        """Accept ``user``'s request; returns ``"accepted"``."""
        reply = await self.request("friend_accept", user=user, timeout=timeout)
        return str(reply.get("result", ""))

    async def friend_reject(self, user: str, *, timeout: Timeout = _DEFAULT) -> str:
        """Reject ``user``'s request; returns ``"rejected"``."""
        reply = await self.request("friend_reject", user=user, timeout=timeout)
        return str(reply.get("result", ""))

    async def friend_remove(self, user: str, *, timeout: Timeout = _DEFAULT) -> str:
        """End a friendship; returns ``"removed"``."""
        reply = await self.request("friend_remove", user=user, timeout=timeout)
        return str(reply.get("result", ""))

    async def block(self, user: str, *, timeout: Timeout = _DEFAULT) -> str:
        """Block ``user`` (idempotent); returns ``"blocked"``."""
        reply = await self.request("block", user=user, timeout=timeout)
        return str(reply.get("result", ""))

    async def unblock(self, user: str, *, timeout: Timeout = _DEFAULT) -> str:
        """Unblock ``user`` (idempotent); returns ``"unblocked"``."""
        reply = await self.request("unblock", user=user, timeout=timeout)
        return str(reply.get("result", ""))

    async def friends(self, *, timeout: Timeout = _DEFAULT) -> list[dict[str, Any]]:
        """Accepted friends with presence: ``[{"user", "status", "last_seen"}...]``."""
        reply = await self.request("friends", timeout=timeout)
        friends: list[dict[str, Any]] = reply.get("friends", [])
        return friends

    async def friend_requests(self, *, timeout: Timeout = _DEFAULT) -> list[dict[str, Any]]:
        """Pending requests both ways: ``[{"user", "direction", "note", "ts"}...]``."""
        reply = await self.request("friend_requests", timeout=timeout)
        requests: list[dict[str, Any]] = reply.get("requests", [])
        return requests

    async def presence(self, status: str, *, timeout: Timeout = _DEFAULT) -> None:
        """Set our presence: ``online``, ``away`` or ``busy``."""
        await self.request("presence", status=status, timeout=timeout)

    async def presence_query(
        self, users: Iterable[str], *, timeout: Timeout = _DEFAULT
    ) -> list[dict[str, Any]]:
        """Presence of the accepted friends among ``users``."""
        reply = await self.request("presence_query", users=list(users), timeout=timeout)
        presence: list[dict[str, Any]] = reply.get("presence", [])
        return presence

    # ------------------------------------------------------------ groups (§8, §11)

    async def group_create(
        self, name: str, members: Iterable[str], *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Create a group; returns ``{"group", "conv", "mid", "seq", "ts"}``."""
        return await self.request("group_create", name=name, members=list(members), timeout=timeout)

    async def group_info(self, group: str, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """``{"group", "conv", "name", "avatar", "owner", "dissolved", "members"...}``."""
        return await self.request("group_info", group=group, timeout=timeout)

    async def group_update(
        self,
        group: str,
        *,
        name: str | None = None,
        avatar: str | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> dict[str, Any]:
        """Change the group's name and/or avatar."""
        return await self.request(
            "group_update", group=group, name=name, avatar=avatar, timeout=timeout
        )

    async def group_dissolve(self, group: str, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """Dissolve the group (owner only)."""
        return await self.request("group_dissolve", group=group, timeout=timeout)

    async def group_add(
        self, group: str, users: Iterable[str], *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Add members; the reply's ``added`` names those who were not members yet."""
        return await self.request("group_add", group=group, users=list(users), timeout=timeout)

    async def group_remove(
        self, group: str, users: Iterable[str], *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Remove members; the reply's ``removed`` names them."""
        return await self.request("group_remove", group=group, users=list(users), timeout=timeout)

    async def group_leave(self, group: str, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """Leave the group."""
        return await self.request("group_leave", group=group, timeout=timeout)

    async def group_role(
        self, group: str, user: str, role: str, *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Set a member's role (``owner`` transfers ownership, ``admin``, ``member``)."""
        return await self.request("group_role", group=group, user=user, role=role, timeout=timeout)

    async def groups(self, *, timeout: Timeout = _DEFAULT) -> list[dict[str, Any]]:
        """The groups we are a member of."""
        reply = await self.request("groups", timeout=timeout)
        groups: list[dict[str, Any]] = reply.get("groups", [])
        return groups

    # ------------------------------------------------------------ notices (§8)

    async def notices(self, *, timeout: Timeout = _DEFAULT) -> list[dict[str, Any]]:
        """Unread notices, newest first: ``[{"id", "kind", "title", "body", "ts"}...]``."""
        reply = await self.request("notices", timeout=timeout)
        notices: list[dict[str, Any]] = reply.get("notices", [])
        return notices

    async def notice_read(self, notice_id: int, *, timeout: Timeout = _DEFAULT) -> None:
        """Mark a notice read (idempotent)."""
        await self.request("notice_read", id=notice_id, timeout=timeout)
