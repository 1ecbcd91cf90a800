"""Typed views of what the server sends: messages, pushes and replies."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Event", "History", "Message", "Push", "SendResult"]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One entry of a conversation (a ``msg`` push or a ``history`` entry).

    Attributes:
        mid: Server-wide message id.
        conv: Conversation id (``d:a:b``, ``g:17``, ``wx:...``).
        seq: Position in the conversation (1, 2, 3, ... without gaps).
        sender: The ``from`` user.
        kind: ``text``, ``image``, ..., ``system`` or ``recall``.
        body: The text (empty for a recalled message).
        ts: Server time in milliseconds since the epoch.
        meta: Optional map (media fields, group change, recalled mid).
        mentions: Users mentioned (groups only).
        reply_to: The mid this message answers, if any.
        cid: The client id (only on the sender's own messages).
        recalled: True for a recalled message seen through ``history``.
        raw: The frame as received.
    """

    mid: int
    conv: str
    seq: int
    sender: str
    kind: str
    body: str
    ts: int
    meta: dict[str, Any] | None = None
    mentions: list[str] | None = None
    reply_to: int | None = None
    cid: str | None = None
    recalled: bool = False
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    op = "msg"

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Message:
        """Build a message from a ``msg`` push or a ``history`` entry."""
        return cls(
            mid=int(frame["mid"]),
            conv=str(frame["conv"]),
            seq=int(frame["seq"]),
            sender=str(frame.get("from", "")),
            kind=str(frame.get("kind", "text")),
            body=str(frame.get("body") or ""),
            ts=int(frame.get("ts", 0)),
            meta=frame.get("meta"),
            mentions=frame.get("mentions"),
            reply_to=frame.get("reply_to"),
            cid=frame.get("cid"),
            recalled=bool(frame.get("recalled", False)),
            raw=dict(frame),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Push:
    """Any other push (``typing``, ``presence``, ``receipt``, ``friend``, ...).

    Also used for events made by the client itself: ``kicked`` (as received),
    ``connected`` / ``disconnected`` (``data`` holds ``attempt`` or
    ``error``), and ``resync`` when pushes other than messages may have been
    dropped because the application did not keep up (messages never are).

    Attributes:
        op: The push's ``op``.
        data: The whole frame.
    """

    op: str
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``data.get(key, default)``."""
        return self.data.get(key, default)


#: What :meth:`clients.Client.events` yields.
Event = Message | Push


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    """The committed identity of a sent message (the ``send`` reply)."""

    mid: int
    conv: str
    seq: int
    ts: int
    cid: str


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """A ``history`` reply: messages in ascending ``seq``, and whether more exist."""

    msgs: list[Message]
    more: bool
