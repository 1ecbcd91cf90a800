"""Requests are bounded before anything parses them: how many at once, and their bodies.

A pure ASGI middleware. Beyond ``max_requests`` requests in progress
(waiting long-polls included) a request is answered 503 ``unavailable`` at
once. Otherwise it reads the whole body (refusing a declared or
actual length over the route's limit with 413 ``too_large`` as soon as it is
known), then hands it to the application in one piece. After that, the
application's ``receive`` waits on the connection itself, so a long-poll
learns when its client goes away (``http.disconnect``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestLimits:
    """Bound requests in progress to ``max_requests``, and every request body:
    ``big`` bytes under ``big_prefix``, else ``small``."""

    def __init__(
        self, app: ASGIApp, *, small: int, big: int, big_prefix: str, max_requests: int
    ) -> None:
        self.app = app
        self.small = small
        self.big = big
        self.big_prefix = big_prefix
        self.max_requests = max_requests
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests:
            await _refuse(send, 503, "unavailable", "too many HTTP requests at once")
            return
        self.in_progress += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.big if scope["path"].startswith(self.big_prefix) else self.small
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    await _refuse(send, 400, "invalid", "Content-Length: not a number")
                    return
                if int(value) > limit:
                    await _refuse(send, 413, "too_large", f"body: over {limit} bytes")
                    return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _refuse(send, 413, "too_large", f"body: over {limit} bytes")
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    payload = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
