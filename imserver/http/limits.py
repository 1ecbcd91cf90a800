"""Requests are bounded before anything parses them: how many at once, how big, how slow.

A pure ASGI middleware in front of the application:

- Beyond ``max_requests`` requests in progress (waiting long-polls included)
  a request is answered 503 ``unavailable`` at once; ``/healthz`` is exempt,
  so a full server is not mistaken for a dead one.
- A request whose body goes to a big-body route (``/wechat/``) must first
  pass ``admit`` (the callback secret in the query, or a signature header to
  check once the body is there): a stranger cannot make the server buffer
  megabytes.
- The body is read whole, refusing a declared or actual length over the
  route's limit with 413 ``too_large`` as soon as it is known, and a body
  not complete within ``body_timeout`` seconds with 408; then it is handed
  to the application in one piece. After that, the application's
  ``receive`` waits on the connection itself, so a long-poll learns when its
  client goes away (``http.disconnect``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths never refused for the number of requests in progress.
EXEMPT_PATHS = frozenset({"/healthz"})


class RequestLimits:
    """Bound requests in progress, request bodies and the time to send them.

    Args:
        app: The application.
        small: Body limit in bytes, except under ``big_prefix``.
        big: Body limit in bytes under ``big_prefix``.
        big_prefix: Path prefix of the big-body routes.
        max_requests: Requests in progress at once.
        body_timeout: Seconds to receive a whole body.
        admit: For big-body routes, called with the scope before the body is
            read; False answers 401.
        refused: Called with the error code of every refusal (metrics).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        small: int,
        big: int,
        big_prefix: str,
        max_requests: int,
        body_timeout: float,
        admit: Callable[[Scope], bool],
        refused: Callable[[str], None],
    ) -> None:
        self.app = app
        self.small = small
        self.big = big
        self.big_prefix = big_prefix
        self.max_requests = max_requests
        self.body_timeout = body_timeout
        self.admit = admit
        self.refused = refused
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_requests and scope["path"] not in EXEMPT_PATHS:
            await self._refuse(send, 503, "unavailable", "too many HTTP requests at once")
            return
        self.in_progress += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_progress -= 1

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        big = scope["path"].startswith(self.big_prefix)
        limit = self.big if big else self.small
        if big and not self.admit(scope):
            await self._refuse(send, 401, "unauthorized", "bad or missing callback token")
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    await self._refuse(send, 400, "invalid", "Content-Length: not a number")
                    return
                if int(value) > limit:
                    await self._refuse(send, 413, "too_large", f"body: over {limit} bytes")
                    return
        body = bytearray()
        with trio.move_on_after(self.body_timeout) as timer:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await self._refuse(send, 413, "too_large", f"body: over {limit} bytes")
                    return
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            await self._refuse(send, 408, "invalid", "body: not received in time")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, status: int, code: str, message: str) -> None:
        self.refused(code)
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
