"""Python clients for imserver: a reliable Trio library and the ``imchat`` terminal client.

The library (:mod:`clients.client`) speaks PROTOCOL.md over TCP or
WebSocket, reconnects, resends unacknowledged messages with their ``cid``
and fills gaps with ``history``, so the application sees every message
exactly once, in order::

    from clients import open_client, Message

    async with open_client("127.0.0.1", 7700, user="alice", password="pw-alice") as c:
        await c.send("bob", "hi")
        async for event in c.events():
            if isinstance(event, Message):
                print(event.sender, event.body)

It depends on :mod:`protocol` (the codec) and trio-websocket, never on the server.
"""

from .client import DEFAULT_RECONNECT_DELAYS, Client, open_client
from .errors import (
    BadFrame,
    ClientClosed,
    ClientError,
    Conflict,
    ConnectionLost,
    Forbidden,
    Internal,
    Invalid,
    NotFound,
    RateLimited,
    RequestError,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownOp,
)
from .model import Event, History, Message, Push, SendResult

__all__ = [
    "DEFAULT_RECONNECT_DELAYS",
    "BadFrame",
    "Client",
    "ClientClosed",
    "ClientError",
    "Conflict",
    "ConnectionLost",
    "Event",
    "Forbidden",
    "History",
    "Internal",
    "Invalid",
    "Message",
    "NotFound",
    "Push",
    "RateLimited",
    "RequestError",
    "RequestTimeout",
    "SendResult",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "UnknownOp",
    "open_client",
]
