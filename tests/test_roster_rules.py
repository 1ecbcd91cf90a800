"""The group rules as a state machine (hypothesis), against a plain model of the spec.

The model below restates issue 3's rules in the most direct way; the machine
applies random changes by random users to both and checks they agree on what
is allowed, what error a refusal gives, and the resulting roster.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from imserver.services import roster as rules
from imserver.services.roster import GroupChange, Roster
from protocol.errors import ErrorCode, OpError

USERS = [f"u{i}" for i in range(8)]
MAX = 5


class Model:
    """The spec, directly: members in join order with roles."""

    def __init__(self, owner: str, invited: list[str]) -> None:
        self.order: list[str] = [owner] + [u for u in dict.fromkeys(invited) if u != owner]
        self.roles = {u: "member" for u in self.order}
        self.roles[owner] = "owner"
        self.dissolved = False

    def apply(self, op: str, actor: str, a: dict[str, Any]) -> ErrorCode | str | None:
        """None: applied; "noop": allowed, nothing changes; else the error code."""
        if self.dissolved:
            return ErrorCode.CONFLICT
        role = self.roles.get(actor)
        if role is None:
            return ErrorCode.FORBIDDEN
        if op == "group_dissolve":
            if role != "owner":
                return ErrorCode.FORBIDDEN
            self.dissolved = True
        elif op == "group_add":
            if role == "member":
                return ErrorCode.FORBIDDEN
            new = [u for u in dict.fromkeys(a["users"]) if u not in self.roles]
            if not new:
                return "noop"
            if len(self.order) + len(new) > MAX:
                return ErrorCode.CONFLICT
            for u in sorted(new):  # joined together: ties go by name
                self.order.append(u)
                self.roles[u] = "member"
        elif op == "group_remove":
            if role == "member":
                return ErrorCode.FORBIDDEN
            targets = list(dict.fromkeys(a["users"]))
            for u in targets:
                if u == actor:
                    return ErrorCode.INVALID
                if u not in self.roles:
                    return ErrorCode.NOT_FOUND
                if role == "admin" and self.roles[u] != "member":
                    return ErrorCode.FORBIDDEN
            for u in targets:
                self.order.remove(u)
                del self.roles[u]
        elif op == "group_leave":
            self.order.remove(actor)
            del self.roles[actor]
            if not self.order:
                self.dissolved = True
            elif role == "owner":
                heir = next((u for u in self.order if self.roles[u] == "admin"), self.order[0])
                self.roles[heir] = "owner"
        elif op == "group_role":
            if role != "owner":
                return ErrorCode.FORBIDDEN
            user, new_role = a["user"], a["role"]
            if user == actor:
                return ErrorCode.INVALID
            if user not in self.roles:
                return ErrorCode.NOT_FOUND
            if self.roles[user] == new_role:
                return "noop"
            self.roles[user] = new_role
            if new_role == "owner":
                self.roles[actor] = "admin"
        elif op == "group_update" and role == "member":
            return ErrorCode.FORBIDDEN
        return None


class GroupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.seq = 1
        invited = ["u1", "u2", "u3"]
        out = rules.apply(
            None,
            GroupChange("group_create", "u0", "1", {"name": "g", "members": invited}),
            self.seq,
            max_members=MAX,
        )
        assert out is not None
        self.roster: Roster = out.after
        self.model = Model("u0", invited)
        for admin in ("u1", "u2"):
            change = GroupChange("group_role", "u0", "1", {"user": admin, "role": "admin"})
            out = rules.apply(self.roster, change, self.seq, max_members=MAX)
            assert out is not None and self.model.apply(change.op, "u0", change.args) is None
            self.roster = out.after

    @rule(
        # Dissolving ends the interesting part, so it is drawn rarely.
        op=st.sampled_from(
            ["group_add", "group_remove", "group_leave", "group_role"] * 4 + ["group_dissolve"]
        ),
        data=st.data(),
    )
    def change(self, op: str, data: st.DataObject) -> None:
        # Mostly members acting on members (where the rules are), sometimes anyone.
        members = sorted(self.roster.members) or USERS
        people = st.sampled_from(members) | st.sampled_from(USERS)
        actor = data.draw(st.sampled_from(members) if data.draw(st.booleans()) else people)
        args = {
            "users": data.draw(st.lists(people, min_size=1, max_size=3)),
            "user": data.draw(people),
            "role": data.draw(st.sampled_from(["owner", "admin", "member"])),
        }
        self.seq += 1
        before = self.roster
        expected = self.model.apply(op, actor, args)
        change = GroupChange(op, actor, "1", dict(args))
        if isinstance(expected, ErrorCode):
            with pytest.raises(OpError) as e:
                rules.apply(before, change, self.seq, max_members=MAX)
            assert e.value.code == expected, (op, actor, args, e.value)
            return
        out = rules.apply(before, change, self.seq, max_members=MAX)
        if out is None:
            assert expected == "noop", (op, actor, args)
            return
        assert expected is None, (op, actor, args, expected)
        # Everyone concerned gets the entry: members before and after.
        assert set(out.recipients) == set(before.members) | set(out.after.members)
        self.roster = out.after

    @invariant()
    def agrees_with_model(self) -> None:
        r = self.roster
        assert {u: m.role for u, m in r.members.items()} == self.model.roles
        assert r.dissolved == self.model.dissolved
        assert len(r.members) <= MAX
        owners = [u for u, m in r.members.items() if m.role == "owner"]
        if r.members:
            assert owners == [r.owner]


GroupMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=25, deadline=None)
test_group_rules = GroupMachine.TestCase


def test_create_over_limit_is_too_large() -> None:
    with pytest.raises(OpError) as e:
        rules.apply(
            None,
            GroupChange("group_create", "a", "1", {"name": "g", "members": USERS}),
            1,
            max_members=MAX,
        )
    assert e.value.code is ErrorCode.TOO_LARGE
