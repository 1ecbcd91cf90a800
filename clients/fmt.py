"""Text formatting shared by the ``imchat`` commands and its TUI."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .model import Message

__all__ = [
    "body_text",
    "clock",
    "conv_line",
    "conv_peer",
    "conv_title",
    "direct_conv",
    "message_line",
    "resolve_conv",
]


def clock(ts_ms: int) -> str:
    """``HH:MM:SS`` in local time for a server timestamp in milliseconds."""
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000))


def direct_conv(me: str, peer: str) -> str:
    """The id of the direct conversation of two users (PROTOCOL.md §4)."""
    a, b = sorted((me, peer))
    return f"d:{a}:{b}"


def resolve_conv(me: str, target: str) -> str:
    """A conversation id from what a user typed: a conv id, or a user name."""
    if target.startswith(("d:", "g:", "wx:")):
        return target
    return direct_conv(me, target)


def conv_peer(me: str, conv: str) -> str | None:
    """The other user of a direct conversation, else None."""
    if not conv.startswith("d:"):
        return None
    users = conv[2:].split(":")
    if len(users) != 2:
        return None
    return users[1] if users[0] == me else users[0]


def conv_title(me: str, conv: str, entry: Mapping[str, Any] | None = None) -> str:
    """A short name: the ``sync`` title, else the peer or the conv id."""
    if entry is not None and entry.get("title"):
        return str(entry["title"])
    return conv_peer(me, conv) or conv


def body_text(msg: Message) -> str:
    """What to print for a message's body (recalls and media included)."""
    if msg.recalled:
        return "(recalled)"
    if msg.kind == "recall":
        return "(recalled a message)"
    if msg.kind == "text" or msg.kind == "system":
        return msg.body
    name = (msg.meta or {}).get("name") or (msg.meta or {}).get("url") or ""
    return f"[{msg.kind}] {msg.body or name}".rstrip()


def message_line(msg: Message, *, with_conv: bool = True) -> str:
    """One line for a message: ``HH:MM:SS conv#seq sender: body``."""
    where = f"{msg.conv}#{msg.seq} " if with_conv else ""
    return f"{clock(msg.ts)} {where}{msg.sender}: {body_text(msg)}"


def conv_line(me: str, entry: Mapping[str, Any]) -> str:
    """One line of the conversation list: id, title, unread count, last message."""
    conv = str(entry.get("conv", ""))
    title = conv_title(me, conv, entry)
    unread = int(entry.get("unread", 0) or 0)
    flags = "".join(f for f, on in (("*", entry.get("pinned")), ("~", entry.get("muted"))) if on)
    last = entry.get("last_msg")
    text = ""
    if isinstance(last, Mapping) and "mid" in last:
        m = Message.from_frame({"conv": conv, **last})
        text = f"{m.sender}: {body_text(m)}"
    return f"{conv}\t{title}{flags}\tunread={unread}\t{text}"
