"""Groups: operations, the roster cache, and the pre-commit check of a batch.

Theory of operation
-------------------
Every group change (create, update, dissolve, add, remove, leave, role) is an
entry of the group's conversation: a ``system`` message that takes the next
``seq``, committed by the batch writer in the same transaction as the change
itself (the rows of ``groups``/``group_members``/``user_convs``). So a change
is ordered with the chat around it, survives reconnects, and a removed member
is cut off exactly at the removal's ``seq``.

A handler checks a request against the cached roster (quick errors), then
queues a :class:`~imserver.storage.records.SendRow` carrying the
:class:`~imserver.services.roster.GroupChange`. Just before each commit the
writer calls :meth:`GroupService.prepare`, which re-checks every row of the
batch in order against the rosters as committed so far plus the changes
earlier in the batch: a change is applied or refused, a group send is
refused if its sender is no longer a member. That check is authoritative, so
nothing depends on what happened between a handler's check and the commit.
Each accepted row gets the roster's member tuple as its recipients: a group
push is encoded once and the same bytes go to every member's device queues.

The roster cache (``groups.cache_size`` entries, least recently used dropped)
holds committed state only: it is filled by :meth:`prepare` (which runs in
the writer task, between commits) and updated from committed batches
(SCALE-OUT point 9). Handlers read it and, on a miss, load a roster from
PostgreSQL for their quick check without installing it.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from protocol.errors import ErrorCode, OpError

from ..storage.errors import StorageUnavailable
from ..storage.records import GroupEffect, RecallEffect, SendRow
from ..transport.base import Payload
from . import roster as rules
from .roster import GroupChange, Member, Outcome, Roster

if TYPE_CHECKING:
    from ..session import Session
    from ..state import ServerState

log = logging.getLogger("imserver.groups")

# Members added in a batch rank after every committed member (their real
# joined_seq is the seq of the entry, known only after the commit); the
# counter keeps them in the order they were added. See roster ranking.
_PENDING_JOIN = itertools.count(2**62)


def group_of(conv: str) -> str | None:
    """The gid of a group conversation id, or None for other ids."""
    return conv[2:] if conv.startswith("g:") and len(conv) > 2 else None


class RecallRequest:
    """A recall queued with its entry; ``seq`` is the recalled message's."""

    __slots__ = ("mid", "reply", "seq")

    def __init__(self, mid: int) -> None:
        self.mid = mid
        self.seq = 0
        self.reply: dict[str, Any] = {}


class GroupService:
    """Group operations, the roster cache and the pre-commit check."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.cache: OrderedDict[str, Roster] = OrderedDict()
        self.cache_size = state.cfg.groups.cache_size
        self.max_members = state.cfg.groups.max_members

    # -- the cache ------------------------------------------------------------

    def _install(self, r: Roster) -> None:
        self.cache[r.gid] = r
        self.cache.move_to_end(r.gid)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def forget(self, gids: Iterable[str]) -> None:
        """Drop rosters from the cache (reloaded from PostgreSQL on next use)."""
        for gid in gids:
            self.cache.pop(gid, None)

    async def _load(self, gid: str) -> Roster | None:
        got = await self.state.storage.load_group(gid)
        if got is None:
            return None
        row, members = got
        return Roster(
            row["gid"],
            row["name"],
            row["avatar"],
            row["owner"],
            row["dissolved"],
            row["created_ms"],
            {u: Member(role, joined) for u, role, joined in members},
        )

    async def roster(self, gid: str) -> Roster | None:
        """The cached roster of ``gid``, else one loaded for a quick check (not cached)."""
        r = self.cache.get(gid)
        if r is not None:
            return r
        return await self._load(gid)

    async def member_roster(self, gid: str, user: str) -> Roster:
        """The roster of a group ``user`` belongs to.

        Raises:
            OpError: not_found (no such group), forbidden (not a member).
        """
        r = await self.roster(gid)
        if r is None:
            raise OpError(ErrorCode.NOT_FOUND, "no such group")
        if user not in r.members:
            raise OpError(ErrorCode.FORBIDDEN, "not a member of this group")
        return r

    # -- operations -------------------------------------------------------------

    async def change(self, session: Session, f: dict[str, Any]) -> None:
        """group_create/update/dissolve/add/remove/leave/role: check, then queue.

        The reply (with the system entry's ``mid``/``seq``) comes after the commit.
        """
        op = f["op"]
        user = session.user
        args = {k: v for k, v in f.items() if k not in ("op", "rid", "group")}
        if op == "group_create":
            members = [u for u in dict.fromkeys(f["members"]) if u != user]
            if len(members) + 1 > self.max_members:
                raise OpError(
                    ErrorCode.TOO_LARGE, f"members: a group holds at most {self.max_members}"
                )
            await self._need_users(members)
            gid = await self.state.storage.next_gid()
            before = None
        else:
            gid = f["group"]
            before = await self.roster(gid)
            if op == "group_add":
                await self._need_users(f["users"])
        change = GroupChange(op, user, gid, args)
        # The quick check; prepare() repeats it in commit order.
        outcome = rules.apply(
            before, change, 0, max_members=self.max_members, now_ms=self.state.clock.now_ms()
        )
        if outcome is None:
            rid = f.get("rid")
            if rid is not None:
                assert before is not None
                await session.respond(self._noop_reply(before, change, rid))
            return
        row = SendRow(
            sender=user,
            cid=None,
            conv=f"g:{gid}",
            conv_kind="group",
            kind="system",
            body="",
            meta=None,
            mentions=None,
            reply_to=None,
            members=(),
            ref=(session, f.get("rid")),
            action=change,
        )
        await self.submit(session, row)

    async def submit(self, session: Session, row: SendRow) -> None:
        """Queue a row answered after its commit (inflight slot, ``unavailable`` when full)."""
        await session.acquire_inflight()
        try:
            self.state.writer.submit_send(row)
        except StorageUnavailable as e:
            session.release_inflight()
            raise OpError(ErrorCode.UNAVAILABLE, str(e)) from None

    @staticmethod
    def _noop_reply(r: Roster, change: GroupChange, rid: int) -> dict[str, Any]:
        reply: dict[str, Any] = {"op": "ok", "rid": rid, "group": r.gid}
        if change.op == "group_add":
            reply["added"] = []
        return reply

    async def _need_users(self, users: list[str]) -> None:
        wanted = list(dict.fromkeys(users))
        known = await self.state.storage.existing_users(wanted)
        unknown = [u for u in wanted if u not in known]
        if unknown:
            raise OpError(ErrorCode.NOT_FOUND, f"no such user: {', '.join(unknown[:10])}")

    async def info(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """group_info: the group and its members (members only)."""
        r = await self.member_roster(f["group"], session.user)
        ranked = sorted(r.members.items(), key=lambda kv: (kv[1].joined_seq, kv[0]))
        return {
            "group": r.gid,
            "conv": r.conv,
            "name": r.name,
            "avatar": r.avatar,
            "owner": r.owner,
            "dissolved": r.dissolved,
            "created": r.created_ms,
            "members": [{"user": u, "role": m.role} for u, m in ranked],
        }

    async def list_groups(self, session: Session, f: dict[str, Any]) -> dict[str, Any]:
        """groups: the groups of the user."""
        return {"groups": await self.state.storage.groups_of(session.user)}

    async def check_send(self, session: Session, gid: str, mentions: list[str] | None) -> Roster:
        """The quick check of a group send (membership, dissolved, mentions).

        Raises:
            OpError: not_found, forbidden, conflict (dissolved), invalid (mentions).
        """
        r = await self.member_roster(gid, session.user)
        if r.dissolved:
            raise OpError(ErrorCode.CONFLICT, "group dissolved")
        if mentions:
            _check_mentions(r, mentions)
        return r

    # -- the pre-commit check (writer task, between commits) --------------------

    async def prepare(self, rows: list[SendRow]) -> list[SendRow]:
        """Check a batch's rows in order; return those to commit, answer the rest.

        Runs in the writer task just before the commit, after every earlier
        batch committed or failed: the cache then holds exactly what
        PostgreSQL holds, so the check is authoritative.

        Raises:
            StorageError: a roster or message could not be loaded (the writer
                fails the whole batch ``unavailable``).
        """
        gids: dict[str, None] = {}
        recalls: list[int] = []
        for row in rows:
            if row.conv_kind == "group":
                gids[row.conv[2:]] = None
            if isinstance(row.action, RecallRequest):
                recalls.append(row.action.mid)
        if not gids and not recalls:
            return rows
        working: dict[str, Roster | None] = {}
        for gid in gids:
            cached = self.cache.get(gid)
            if cached is None:
                cached = await self._load(gid)
                if cached is not None:
                    self._install(cached)
            else:
                self.cache.move_to_end(gid)
            working[gid] = cached
        states = await self.state.storage.message_states(recalls) if recalls else {}
        recalled_now: set[int] = set()
        now = self.state.clock.now_ms()
        accepted: list[SendRow] = []
        refused: list[tuple[SendRow, OpError | dict[str, Any]]] = []
        for row in rows:
            try:
                if isinstance(row.action, GroupChange):
                    gid = row.action.gid
                    outcome = rules.apply(
                        working.get(gid),
                        row.action,
                        next(_PENDING_JOIN),
                        max_members=self.max_members,
                        now_ms=now,
                    )
                    if outcome is None:
                        before = working.get(gid)
                        assert before is not None
                        refused.append((row, self._noop_reply(before, row.action, 0)))
                        continue
                    working[gid] = outcome.after
                    self._fill_change(row, outcome)
                elif isinstance(row.action, RecallRequest):
                    self._check_recall(row, row.action, states, recalled_now, working, now)
                elif row.conv_kind == "group":
                    group = working.get(row.conv[2:])
                    if group is None:
                        raise OpError(ErrorCode.NOT_FOUND, "no such group")
                    if row.sender not in group.members:
                        raise OpError(ErrorCode.FORBIDDEN, "not a member of this group")
                    if group.dissolved:
                        raise OpError(ErrorCode.CONFLICT, "group dissolved")
                    if row.mentions:
                        _check_mentions(group, row.mentions)
                    row.members = group.member_tuple()
            except OpError as e:
                refused.append((row, e))
                continue
            accepted.append(row)
        if refused:
            await self._answer_refused(refused)
        return accepted

    def _fill_change(self, row: SendRow, outcome: Outcome) -> None:
        after = outcome.after
        event = outcome.event
        row.body = rules.describe(row.sender, event)
        row.meta = event
        row.members = outcome.recipients
        upsert = [(u, after.members[u].role, 0) for u in outcome.added]
        upsert += [(u, role, 0) for u, role in outcome.changed_roles.items()]
        row.effect = GroupEffect(
            gid=after.gid,
            name=after.name,
            avatar=after.avatar,
            owner=after.owner,
            dissolved=after.dissolved,
            created_ms=after.created_ms,
            upsert=upsert,
            added=outcome.added,
            removed=outcome.removed,
        )
        assert isinstance(row.action, GroupChange)
        row.action.outcome = outcome

    def _check_recall(
        self,
        row: SendRow,
        req: RecallRequest,
        states: dict[int, dict[str, Any]],
        recalled_now: set[int],
        working: dict[str, Roster | None],
        now: int,
    ) -> None:
        st = states.get(req.mid)
        check_recall(st, row.sender, now, self.state.cfg.chat.recall_window_s)
        assert st is not None
        if req.mid in recalled_now:
            raise OpError(ErrorCode.CONFLICT, "already recalled")
        gid = group_of(st["conv"])
        if gid is not None:
            r = working.get(gid)
            if r is None or row.sender not in r.members:
                raise OpError(ErrorCode.FORBIDDEN, "not a member of this group")
            if r.dissolved:
                raise OpError(ErrorCode.CONFLICT, "group dissolved")
            row.members = r.member_tuple()
        recalled_now.add(req.mid)
        req.seq = st["seq"]
        row.effect = RecallEffect(req.mid)

    async def _answer_refused(
        self, refused: list[tuple[SendRow, OpError | dict[str, Any]]]
    ) -> None:
        storage = self.state.storage
        for row, why in refused:
            if row.ref is None:
                continue
            session, rid = row.ref
            session.release_inflight()
            if isinstance(why, dict):  # accepted, but it changes nothing
                if rid is not None:
                    session.reply({**why, "rid": rid})
                continue
            # A refused send whose (sender, cid) is already stored is a repeat:
            # it answers like the first send, whatever changed since (PROTOCOL §5).
            first = await storage.find_sent(row.sender, row.cid) if row.cid else None
            if first is not None:
                if rid is not None:
                    session.reply({"op": "ok", "rid": rid, **first})
                continue
            self.state.stats.error(why.code.value)
            session.reply(why.to_frame(rid))

    # -- after the commit -------------------------------------------------------

    def committed(self, row: SendRow) -> None:
        """Install the roster of a committed change and push the ``group`` event."""
        outcome = row.action.outcome
        self._install(outcome.after)
        origin = row.ref[0] if row.ref is not None else None
        event = {"op": "group", **outcome.event, "by": row.sender, "seq": row.seq}
        self.state.hub.publish(row.members, Payload(event), exclude=origin)

    def reply_fields(self, row: SendRow) -> dict[str, Any]:
        """Extra fields of the requester's ``ok`` for a committed change."""
        outcome: Outcome = row.action.outcome
        return outcome.reply


def _check_mentions(r: Roster, mentions: list[str]) -> None:
    strangers = [u for u in mentions if u not in r.members]
    if strangers:
        raise OpError(ErrorCode.INVALID, f"mentions: not members: {', '.join(strangers[:10])}")


def check_recall(st: dict[str, Any] | None, user: str, now_ms: int, window_s: int) -> None:
    """The rules of a recall of the stored message ``st`` by ``user``.

    Raises:
        OpError: not_found, forbidden (not the sender, a server entry, window
            over), conflict (already recalled).
    """
    if st is None:
        raise OpError(ErrorCode.NOT_FOUND, "no such message")
    if st["sender"] != user:
        raise OpError(ErrorCode.FORBIDDEN, "only the sender recalls a message")
    if st["kind"] in ("system", "recall"):
        raise OpError(ErrorCode.FORBIDDEN, "this entry cannot be recalled")
    if st["recalled"]:
        raise OpError(ErrorCode.CONFLICT, "already recalled")
    if now_ms - st["ts"] > window_s * 1000:
        raise OpError(ErrorCode.FORBIDDEN, f"recall window of {window_s} s is over")
