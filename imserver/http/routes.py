"""The routes of the HTTP shim (PROTOCOL §9), over the same services as the sessions.

Each route validates its input (the framed protocol's schemas where the
operation is the same: register, login, history), checks the caller, calls a
service, and answers JSON. Lists come in the framed protocol's envelopes.
Authenticated routes take ``Authorization: Bearer <token>``; their callers are
rate-limited with the same ``requests`` bucket as framed requests.

No ``from __future__ import annotations`` here: FastAPI reads the route
signatures at run time, including the ``User`` alias local to :func:`build_app`.
"""

import base64
import binascii
import dataclasses
import hmac
import importlib.util
import logging
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import trio
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from protocol import schema
from protocol.errors import ErrorCode, OpError

from .. import __version__
from ..storage.errors import StorageError
from . import errors, metrics
from .limits import RequestLimits

if TYPE_CHECKING:
    from ..state import ServerState

log = logging.getLogger("imserver.http")

MAX_QUERY_CHARS = 256
_CURSOR_RE = re.compile(r"[A-Za-z0-9_-]{1,40}")
_CURSOR_PREFIX = b"m1:"


@dataclasses.dataclass(slots=True)
class HttpCaller:
    """The authenticated user of one request, where services expect a session."""

    user: str


class Credentials(BaseModel):
    """Body of register and login."""

    model_config = ConfigDict(strict=True, extra="forbid")
    user: str
    password: str
    device: str = "default"


class NoticeIn(BaseModel):
    """Body of ``POST /api/v1/admin/notices`` (no ``users``: everyone)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    kind: str = "system"
    title: str = ""
    body: str
    users: list[str] | None = None


def encode_cursor(mid: int) -> str:
    """An opaque long-poll cursor for "everything after ``mid``" (SCALE-OUT point 8)."""
    return base64.urlsafe_b64encode(_CURSOR_PREFIX + str(mid).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The position a cursor from :func:`encode_cursor` stands for.

    Raises:
        OpError: invalid for anything this server did not hand out.
    """
    bad = OpError(ErrorCode.INVALID, "cursor: not a cursor from this server")
    if not _CURSOR_RE.fullmatch(cursor):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    digits = raw[len(_CURSOR_PREFIX) :]
    if not raw.startswith(_CURSOR_PREFIX) or not digits.isdigit() or len(digits) > 18:
        raise bad
    return int(digits)


def default_static_dir() -> Path | None:
    """The browser client shipped in ``clients/web``, if installed."""
    spec = importlib.util.find_spec("clients")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        web = Path(location) / "web"
        if (web / "index.html").is_file():
            return web
    return None


def build_app(state: "ServerState") -> Any:
    """The ASGI application of the HTTP shim for one server."""
    cfg = state.cfg
    app = FastAPI(
        title="imserver HTTP shim",
        version=__version__,
        description="PROTOCOL.md section 9: the framed protocol's reads, long-poll, "
        "login, WeChat callbacks and admin notices over JSON.",
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app, state)
    bearer = HTTPBearer(auto_error=False)
    registry = metrics.registry_for(state)

    def client_host(request: Request) -> str:
        return request.client.host if request.client is not None else "?"

    async def current_user(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise OpError(ErrorCode.UNAUTHORIZED, "Authorization: Bearer <token> required")
        token = credentials.credentials
        if not 1 <= len(token) <= 256:
            raise OpError(ErrorCode.UNAUTHORIZED, "bad token")
        user, _ = await state.auth.check_token(token)
        wait = state.hub.rate("requests", user, trio.current_time())
        if wait:
            raise OpError(ErrorCode.RATE_LIMITED, "requests rate exceeded", retry_after=wait)
        return user

    User = Annotated[str, Depends(current_user)]

    # -- accounts --------------------------------------------------------------

    async def _token_for(op: str, body: Credentials, request: Request) -> dict[str, str]:
        """Register or check the password (framed rules and rate limits), then a token."""
        f = schema.validate({"op": op, **body.model_dump()})
        check = state.auth.register if op == "register" else state.auth.check_password
        await check(f["user"], f["password"], client_host(request))
        token, _ = await state.auth.issue_token(f["user"], f["device"])
        return {"user": f["user"], "token": token}

    @app.post("/api/v1/register", tags=["accounts"])
    async def register(body: Credentials, request: Request) -> dict[str, str]:
        """Create a user (when open registration is on) and a token for ``device``."""
        return await _token_for("register", body, request)

    @app.post("/api/v1/login", tags=["accounts"])
    async def login(body: Credentials, request: Request) -> dict[str, str]:
        """Check a password and hand out a token for ``device``."""
        return await _token_for("login", body, request)

    # -- reading ---------------------------------------------------------------

    @app.get("/api/v1/conversations", tags=["messages"])
    async def conversations(user: User) -> dict[str, Any]:
        """The ``sync`` list: the user's conversations, most recent first."""
        return await state.chat.sync(HttpCaller(user), {})  # type: ignore[arg-type]

    @app.get("/api/v1/conversations/{conv:path}/messages", tags=["messages"])
    async def messages(
        conv: str,
        user: User,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """``history``: a page of one conversation, ascending seq."""
        frame: dict[str, Any] = {"op": "history", "conv": conv, "limit": limit}
        if before_seq is not None:
            frame["before_seq"] = before_seq
        if after_seq is not None:
            frame["after_seq"] = after_seq
        f = schema.validate(frame)
        return await state.chat.history(HttpCaller(user), f)  # type: ignore[arg-type]

    @app.get("/api/v1/search", tags=["messages"])
    async def search(
        user: User,
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
        conv: Annotated[str | None, Query(min_length=1, max_length=300)] = None,
        limit: Annotated[int, Query(ge=1)] = 20,
        before_mid: Annotated[int | None, Query(ge=1, le=2**53 - 1)] = None,
    ) -> dict[str, Any]:
        """Messages of the user's own conversations containing ``q``, newest first."""
        if limit > cfg.http.search_max_limit:
            raise OpError(ErrorCode.INVALID, f"limit: 1 to {cfg.http.search_max_limit}")
        msgs, more = await state.storage.search(user, q, conv, limit, before_mid)
        return {"msgs": msgs, "more": more}

    @app.get("/api/v1/poll", tags=["messages"])
    async def poll(
        request: Request,
        user: User,
        cursor: Annotated[str | None, Query(max_length=64)] = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Long-poll: messages after ``cursor``, waiting up to ``timeout`` s for one."""
        http = cfg.http
        wait_s = http.poll_timeout_s if timeout is None else timeout
        if not 0 <= wait_s <= http.poll_max_timeout_s:
            raise OpError(ErrorCode.INVALID, f"timeout: 0 to {http.poll_max_timeout_s:g} seconds")
        if cursor is None:
            _, last = await state.storage.poll_since(user, None, 0)
            return {"messages": [], "cursor": encode_cursor(last)}
        after = decode_cursor(cursor)
        return await _long_poll(state, request, user, after, cursor, wait_s)

    # -- WeChat, admin ---------------------------------------------------------

    @app.post("/wechat/callback", tags=["wechat"])
    async def wechat_callback(request: Request, token: str | None = None) -> dict[str, str]:
        """A Gewechat event (PROTOCOL §10); 200 once stored."""
        body = await request.body()
        await state.wechat.callback(body, token, request.headers.get("x-signature"))
        return {"status": "success"}

    @app.post("/api/v1/admin/notices", tags=["admin"])
    async def create_notice(
        body: NoticeIn,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> dict[str, Any]:
        """Create a notice and push it to its users' online devices (admin token)."""
        admin = cfg.http.admin_token
        if not admin:
            raise OpError(ErrorCode.FORBIDDEN, "the admin API is disabled (http.admin_token)")
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), admin.encode()):
            raise OpError(ErrorCode.UNAUTHORIZED, "admin token required")
        return await state.notices.create(body.kind, body.title, body.body, body.users)

    # -- operations --------------------------------------------------------------

    @app.get("/healthz", tags=["operations"])
    async def healthz(response: Response) -> dict[str, str]:
        """200 when PostgreSQL answers, else 503."""
        up = False
        with trio.move_on_after(min(2.0, cfg.database.query_timeout)):
            try:
                await state.storage.ping()
                up = True
            except StorageError:
                up = False
        if not up:
            response.status_code = 503
            return {"status": "unavailable", "storage": "down"}
        return {"status": "ok", "storage": "up"}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_route() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    @app.get("/api/v1/info", tags=["operations"])
    async def info() -> dict[str, Any]:
        """Where the framed transports listen (the browser page finds the WebSocket here)."""
        return {
            "version": __version__,
            "tcp_port": state.ports.get("tcp"),
            "ws_port": state.ports.get("ws"),
            "ws_path": cfg.websocket.path,
            "http_port": state.ports.get("http"),
        }

    static = Path(cfg.http.static_dir) if cfg.http.static_dir else default_static_dir()
    if static is not None and static.is_dir():
        app.mount("/", StaticFiles(directory=static, html=True), name="web")

    def admit_callback(scope: Any) -> bool:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        tokens = query.get("token", [])
        signed = any(name == b"x-signature" for name, _ in scope.get("headers", ()))
        return state.wechat.may_post(tokens[0] if tokens else None, signed)

    return RequestLimits(
        app,
        small=cfg.http.max_json_body_bytes,
        big=cfg.http.max_body_bytes,
        big_prefix="/wechat/",
        max_requests=cfg.http.max_requests,
        body_timeout=cfg.http.body_timeout_s,
        admit=admit_callback,
        refused=state.stats.error,
    )


async def _long_poll(
    state: "ServerState", request: Request, user: str, after: int, cursor: str, wait_s: float
) -> dict[str, Any]:
    """Answer at once if anything is newer than ``after``, else wait for a commit."""
    pollers = state.hub.pollers
    limit = state.cfg.http.poll_max_messages
    deadline = trio.current_time() + wait_s
    msgs, last = await state.storage.poll_since(user, after, limit)
    while not msgs and trio.current_time() < deadline:
        # Register, then read again: a commit between that read and the wait
        # still wakes this poll. Only polls that wait count against the caps.
        event = pollers.register(user)
        try:
            msgs, last = await state.storage.poll_since(user, after, limit)
            if msgs:
                break
            outcome = await _wait(event, deadline, request, state.shutting_down)
        finally:
            pollers.unregister(user, event)
        if outcome != "woken":
            break
        msgs, last = await state.storage.poll_since(user, after, limit)
    return {"messages": msgs, "cursor": encode_cursor(last)}


async def _wait(
    event: trio.Event, deadline: float, request: Request, shutting_down: trio.Event
) -> str:
    """Until a commit wakes ``event``, the deadline, the client leaving, or shutdown."""
    outcome = "timeout"

    async def until_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:

            async def watch(name: str, fn: Any) -> None:
                nonlocal outcome
                await fn()
                outcome = name
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch, "woken", event.wait)
            nursery.start_soon(watch, "gone", until_disconnect)
            nursery.start_soon(watch, "shutdown", shutting_down.wait)
    return outcome
