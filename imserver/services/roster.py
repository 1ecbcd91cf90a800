"""Group rosters and the rules of group changes, as pure functions (no I/O).

A :class:`Roster` is one group's committed state: name, avatar, owner,
whether it is dissolved, and its members with their roles and the ``seq`` at
which they joined. Rosters are treated as immutable: :func:`apply` checks one
change against a roster and returns a new roster plus the event that
describes the change, or raises :class:`~protocol.errors.OpError` and changes
nothing. The same function serves the quick check a handler makes before it
queues a change and the authoritative check the batch writer makes, in commit
order, just before the commit (see :mod:`imserver.services.groups`).

The rules (PROTOCOL §8, issue 3):

- only the owner dissolves the group, transfers ownership and sets roles;
- the owner and admins add and remove members, and rename the group; an admin
  cannot remove the owner or another admin;
- anyone may leave; an owner who leaves hands ownership to the
  longest-standing admin, else the longest-standing member; the last member
  to leave dissolves the group;
- at most ``max_members`` members, the owner included: an add that would pass
  it is ``conflict`` and adds no one;
- a dissolved group accepts no change (``conflict``); its members can still
  read its history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from protocol.errors import ErrorCode, OpError

OWNER = "owner"
ADMIN = "admin"
MEMBER = "member"


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """One member's role and the seq of the entry that added them."""

    role: str
    joined_seq: int


class Roster:
    """One group's committed state. Never mutated after construction."""

    __slots__ = ("_tuple", "avatar", "created_ms", "dissolved", "gid", "members", "name", "owner")

    def __init__(
        self,
        gid: str,
        name: str,
        avatar: str,
        owner: str,
        dissolved: bool,
        created_ms: int,
        members: Mapping[str, Member],
    ) -> None:
        self.gid = gid
        self.name = name
        self.avatar = avatar
        self.owner = owner
        self.dissolved = dissolved
        self.created_ms = created_ms
        self.members: Mapping[str, Member] = MappingProxyType(dict(members))
        self._tuple: tuple[str, ...] | None = None

    def __repr__(self) -> str:
        return f"<Roster g:{self.gid} members={len(self.members)} dissolved={self.dissolved}>"

    @property
    def conv(self) -> str:
        """The group's conversation id."""
        return f"g:{self.gid}"

    def member_tuple(self) -> tuple[str, ...]:
        """The members, as one tuple shared by every push of this roster."""
        t = self._tuple
        if t is None:
            t = self._tuple = tuple(self.members)
        return t

    def role(self, user: str) -> str | None:
        """``user``'s role, or None if not a member."""
        m = self.members.get(user)
        return None if m is None else m.role

    def replace(self, **changes: Any) -> Roster:
        """A copy with some attributes changed."""
        fields: dict[str, Any] = {
            "gid": self.gid,
            "name": self.name,
            "avatar": self.avatar,
            "owner": self.owner,
            "dissolved": self.dissolved,
            "created_ms": self.created_ms,
            "members": self.members,
        }
        fields.update(changes)
        return Roster(**fields)


@dataclasses.dataclass(slots=True)
class GroupChange:
    """One requested change: ``op`` is the protocol operation name.

    ``args`` holds the operation's own fields (``name``, ``avatar``,
    ``users``, ``user``, ``role``, ``members``).
    """

    op: str
    actor: str
    gid: str
    args: dict[str, Any]
    #: Set by the pre-commit check when the change is accepted.
    outcome: Outcome | None = None


@dataclasses.dataclass(slots=True)
class Outcome:
    """What an accepted change does.

    Attributes:
        after: The roster after the change.
        event: The ``group`` push / system entry fields (``event``, ``group``,
            ``by``, and what changed).
        added: Users who became members.
        removed: Users who stopped being members.
        changed_roles: Users whose role changed, with the new role.
        recipients: Who gets the system entry: members before and after.
        reply: Fields for the requester's ``ok`` besides the entry's ids.
    """

    after: Roster
    event: dict[str, Any]
    added: list[str]
    removed: list[str]
    changed_roles: dict[str, str]
    recipients: tuple[str, ...]
    reply: dict[str, Any]


def _forbidden(what: str) -> OpError:
    return OpError(ErrorCode.FORBIDDEN, what)


def _need_member(r: Roster, user: str) -> str:
    role = r.role(user)
    if role is None:
        raise _forbidden("not a member of this group")
    return role


def _dedupe(users: list[str]) -> list[str]:
    return list(dict.fromkeys(users))


def _longest_standing(members: Mapping[str, Member], role: str) -> str | None:
    ranked = sorted((m.joined_seq, u) for u, m in members.items() if m.role == role)
    return ranked[0][1] if ranked else None


def apply(
    before: Roster | None,
    change: GroupChange,
    seq: int,
    *,
    max_members: int,
    now_ms: int = 0,
) -> Outcome | None:
    """Check ``change`` against ``before`` and describe its result.

    ``seq`` is the seq the change's system entry will take (new members'
    ``joined_seq``). Returns None for an accepted change that changes
    nothing (adding only current members, setting a role a member already
    has); then no entry is written.

    Raises:
        OpError: ``not_found`` (no such group, or the user named is not a
            member), ``forbidden`` (not a member, not allowed for the role),
            ``conflict`` (dissolved, over ``max_members``), ``too_large``
            (``group_create`` over ``max_members``), ``invalid`` (a change
            aimed at oneself that has another way).
    """
    op, actor, a = change.op, change.actor, change.args
    if op == "group_create":
        invited = [u for u in _dedupe(a["members"]) if u != actor]
        if len(invited) + 1 > max_members:
            raise OpError(ErrorCode.TOO_LARGE, f"members: a group holds at most {max_members}")
        roster = Roster(
            change.gid,
            a["name"],
            "",
            actor,
            False,
            now_ms,
            {actor: Member(OWNER, seq), **{u: Member(MEMBER, seq) for u in invited}},
        )
        created = {"event": "created", "name": roster.name, "owner": actor, "users": invited}
        return _outcome(None, roster, created, [actor, *invited], [], {}, {"conv": roster.conv})
    if before is None:
        raise OpError(ErrorCode.NOT_FOUND, "no such group")
    if before.dissolved:
        raise OpError(ErrorCode.CONFLICT, "group dissolved")
    role = _need_member(before, actor)
    members = dict(before.members)

    if op == "group_update":
        if role == MEMBER:
            raise _forbidden("only the owner and admins change the group")
        changes: dict[str, Any] = {k: a[k] for k in ("name", "avatar") if k in a}
        if all(getattr(before, k) == v for k, v in changes.items()):
            return None
        after = before.replace(**changes)
        return _outcome(before, after, {"event": "updated", **changes}, [], [], {}, {})

    if op == "group_dissolve":
        if role != OWNER:
            raise _forbidden("only the owner dissolves the group")
        after = before.replace(dissolved=True)
        return _outcome(before, after, {"event": "dissolved"}, [], [], {}, {})

    if op == "group_add":
        if role == MEMBER:
            raise _forbidden("only the owner and admins add members")
        new = [u for u in _dedupe(a["users"]) if u not in members]
        if not new:
            return None
        if len(members) + len(new) > max_members:
            raise OpError(
                ErrorCode.CONFLICT,
                f"group full: {len(members)} members, at most {max_members}",
            )
        for u in new:
            members[u] = Member(MEMBER, seq)
        after = before.replace(members=members)
        return _outcome(
            before, after, {"event": "added", "users": new}, new, [], {}, {"added": new}
        )

    if op == "group_remove":
        if role == MEMBER:
            raise _forbidden("only the owner and admins remove members")
        users = _dedupe(a["users"])
        for u in users:
            if u == actor:
                raise OpError(ErrorCode.INVALID, "users: use group_leave to leave")
            target = before.role(u)
            if target is None:
                raise OpError(ErrorCode.NOT_FOUND, f"{u} is not a member")
            if role == ADMIN and target != MEMBER:
                raise _forbidden(f"an admin cannot remove the {target} {u}")
        for u in users:
            del members[u]
        after = before.replace(members=members)
        return _outcome(
            before, after, {"event": "removed", "users": users}, [], users, {}, {"removed": users}
        )

    if op == "group_leave":
        del members[actor]
        left: dict[str, Any] = {"event": "left", "users": [actor]}
        owner = before.owner
        roles: dict[str, str] = {}
        dissolved = False
        if not members:
            dissolved = True
            left["dissolved"] = True
        elif role == OWNER:
            owner = _longest_standing(members, ADMIN) or _longest_standing(members, MEMBER) or ""
            members[owner] = Member(OWNER, members[owner].joined_seq)
            roles[owner] = OWNER
            left["owner"] = owner
        after = before.replace(members=members, owner=owner, dissolved=dissolved)
        return _outcome(before, after, left, [], [actor], roles, {})

    if op == "group_role":
        user, new_role = a["user"], a["role"]
        if role != OWNER:
            raise _forbidden("only the owner sets roles")
        if user == actor:
            raise OpError(ErrorCode.INVALID, "user: the owner's role changes by transfer")
        current = members.get(user)
        if current is None:
            raise OpError(ErrorCode.NOT_FOUND, f"{user} is not a member")
        if current.role == new_role:
            return None
        members[user] = Member(new_role, current.joined_seq)
        roles = {user: new_role}
        owner = before.owner
        changed: dict[str, Any] = {"event": "role", "user": user, "role": new_role}
        if new_role == OWNER:
            members[actor] = Member(ADMIN, members[actor].joined_seq)
            roles[actor] = ADMIN
            owner = user
            changed["owner"] = user
        after = before.replace(members=members, owner=owner)
        return _outcome(before, after, changed, [], [], roles, {})

    raise ValueError(f"not a group change: {op!r}")


def _outcome(
    before: Roster | None,
    after: Roster,
    event: dict[str, Any],
    added: list[str],
    removed: list[str],
    roles: dict[str, str],
    reply: dict[str, Any],
) -> Outcome:
    if before is None or before.members.keys() == after.members.keys():
        recipients = after.member_tuple()
    else:
        recipients = tuple(dict.fromkeys([*before.members, *after.members]))
    return Outcome(
        after=after,
        event={"group": after.gid, **event},
        added=added,
        removed=removed,
        changed_roles=roles,
        recipients=recipients,
        reply={"group": after.gid, **reply},
    )


def describe(actor: str, event: dict[str, Any]) -> str:
    """A short human text for the system entry of ``event`` (clients may use ``meta``)."""
    kind = event["event"]
    users = event.get("users") or []
    names = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    if kind == "created":
        return f"{actor} created the group {event['name']!r}"
    if kind == "updated":
        parts = [f"name to {event['name']!r}"] if "name" in event else []
        if "avatar" in event:
            parts.append("the avatar")
        return f"{actor} changed " + " and ".join(parts)
    if kind == "dissolved":
        return f"{actor} dissolved the group"
    if kind == "added":
        return f"{actor} added {names}"
    if kind == "removed":
        return f"{actor} removed {names}"
    if kind == "left":
        text = f"{actor} left the group"
        if "owner" in event:
            text += f"; {event['owner']} is the owner now"
        return text
    if kind == "role":
        return f"{actor} made {event['user']} {event['role']}"
    return f"{actor}: {kind}"
