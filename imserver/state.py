"""The server's shared objects, built once by :func:`imserver.app.serve`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import trio

from .clock import Clock
from .config import Config
from .hub.hub import Hub
from .storage.db import Storage
from .storage.writer import BatchWriter

if TYPE_CHECKING:
    from .services.auth import AuthService
    from .services.chat import ChatService
    from .services.friends import FriendService
    from .services.groups import GroupService
    from .services.lifecycle import LifecycleService
    from .services.notices import NoticeService
    from .services.wechat import WeChatService
    from .session import Session


@dataclasses.dataclass
class Stats:
    """Counters for logs and metrics."""

    connections: dict[str, int] = dataclasses.field(default_factory=lambda: {"tcp": 0, "ws": 0})
    accepted_total: int = 0
    messages_accepted: int = 0
    messages_delivered: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    kicks: dict[str, int] = dataclasses.field(default_factory=dict)

    def error(self, code: str) -> None:
        """Count an error reply."""
        self.errors[code] = self.errors.get(code, 0) + 1


@dataclasses.dataclass
class ServerState:
    """Everything a session or service needs, passed explicitly (no globals)."""

    cfg: Config
    clock: Clock
    storage: Storage
    writer: BatchWriter
    hub: Hub
    auth: AuthService
    chat: ChatService
    friends: FriendService
    groups: GroupService
    lifecycle: LifecycleService
    notices: NoticeService
    wechat: WeChatService
    stats: Stats
    sessions: dict[str, Session] = dataclasses.field(default_factory=dict)
    shutting_down: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: Where each listener is bound, once it is: "tcp", "ws", "http" -> port.
    ports: dict[str, int | None] = dataclasses.field(default_factory=dict)
