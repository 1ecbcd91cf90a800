"""Plain data passed between the storage layer and the services."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(slots=True)
class SendRow:
    """One message to commit. ``ref`` is opaque to storage (the reply route)."""

    sender: str
    cid: str | None
    conv: str
    conv_kind: str
    kind: str
    body: str | None
    meta: dict[str, Any] | None
    mentions: list[str] | None
    reply_to: int | None
    members: tuple[str, ...]
    ref: Any = None
    # Set by the services for entries the server makes (group changes,
    # recalls): ``action`` is the service's own request, ``effect`` what the
    # commit applies in the same transaction, after the insert.
    action: Any = None
    effect: GroupEffect | RecallEffect | None = None
    #: The entry's own time, kept by the commit (WeChat's CreateTime); None:
    #: the commit's clock.
    own_ts: int | None = None
    # Filled by the commit:
    mid: int = 0
    seq: int = 0
    ts: int = 0
    repeat: bool = False


@dataclasses.dataclass(slots=True)
class GroupEffect:
    """A group change to store with its system entry (the roster after it)."""

    gid: str
    name: str
    avatar: str
    owner: str
    dissolved: bool
    created_ms: int
    #: (user, role, joined_seq) of members added or whose role changed.
    upsert: list[tuple[str, str, int]]
    #: Users who joined: their user_convs row is (re)opened at this entry.
    added: list[str]
    #: Users who left or were removed at this entry.
    removed: list[str]


@dataclasses.dataclass(slots=True)
class RecallEffect:
    """Erase the body and meta of message ``mid`` and mark it recalled."""

    mid: int


@dataclasses.dataclass(slots=True)
class CursorUpdate:
    """A read or delivered cursor (coalesced per (user, conv, field) in a batch)."""

    user: str
    conv: str
    field: str  # "read" or "delivered"
    seq: int
    refs: list[Any] = dataclasses.field(default_factory=list)
    changed: bool = False


@dataclasses.dataclass(slots=True)
class BatchResult:
    """What one committed batch did, in commit order (SCALE-OUT point 2)."""

    writer_id: int
    incarnation: int
    batch_no: int
    rows: list[SendRow]
    cursors: list[CursorUpdate]


@dataclasses.dataclass(slots=True)
class Relations:
    """One user's friendships and blocks, as committed."""

    friends: set[str]
    blocking: set[str]
    blocked_by: set[str]

    def blocked_with(self, other: str) -> bool:
        """True when either side blocks the other."""
        return other in self.blocking or other in self.blocked_by
