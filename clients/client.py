"""A reliable Trio client for imserver (PROTOCOL.md), over TCP or WebSocket.

Theory of operation
-------------------

A :class:`Client` runs two background tasks in a nursery you give it (or
that :func:`open_client` makes):

* the **supervisor** keeps one connection open. After the first successful
  ``login``/``register``/``auth`` it remembers the token; when the
  connection drops (no ``pong`` within ``pong_timeout``, the server went
  away, a ``slow_consumer`` or ``shutdown`` kick, ...) it reconnects after
  ``reconnect_delays`` (0, 2, 5, 10, then every 30 s by default), sends
  ``auth`` with the token, then writes again every ``send`` that has no
  reply yet, with its original ``cid`` (the server answers a repeat with the
  first send's ``mid/conv/seq/ts``, PROTOCOL.md §5). Each connection has a
  reader task, which answers requests by ``rid`` and never blocks, and a
  heartbeat task (``ping`` every ``heartbeat`` seconds).
* the **delivery** task (:mod:`clients.delivery`) turns what the reader
  queued into the application's events, in order. It keeps, per conversation, the highest ``seq``
  delivered (:attr:`Client.cursors`). A message at or below it is a
  duplicate and dropped; one above ``cursor + 1`` is a gap, filled with
  ``history`` first. After every (re)authentication it runs ``sync`` and
  fills every conversation whose ``last_seq`` passed its cursor. So the
  application sees each message exactly once, in ``seq`` order per
  conversation, across reconnects and server restarts (PROTOCOL.md §6).

The first ``sync`` after the first authentication sets the baseline: the
application gets what was committed after it authenticated, so a
conversation that already existed starts at its ``last_seq`` less what was
pushed since (read older messages with :meth:`Client.history`), unless you
seeded its cursor with ``cursors=``. A conversation that first appears
later is delivered from its first entry. The sender's own messages are
events too (built from the ``send`` reply, since the sending connection
gets no ``msg`` push), as are the entries that its ``recall`` and group
operations create (fetched with ``history``).

Everything is bounded: the reader's queue (``max_events``; when the
application does not keep up, messages are dropped and recovered with a
later ``sync``, and other pushes are dropped and announced with a
``resync`` event), the event channel (``max_events``), and the outbox of
unacknowledged sends (``max_outbox``; ``send`` waits for room).

Example::

    async with open_client("127.0.0.1", 7700, user="alice", password="secret-pw") as c:
        sent = await c.send("bob", "hi")
        async for event in c.events():
            if isinstance(event, Message):
                print(event.conv, event.seq, event.sender, event.body)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeAlias

import trio

from .delivery import Delivery, Hint, Item, Resync
from .errors import (
    ClientClosed,
    ConnectionLost,
    RateLimited,
    RequestError,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    error_from_frame,
)
from .model import Event, History, Message, Push, SendResult
from .ops import DEFAULT, Operations, Timeout, _Default
from .transport import Encoding, Transport, TransportClosed, TransportKind, open_transport

__all__ = [
    "DEFAULT_RECONNECT_DELAYS",
    "Client",
    "open_client",
]

log = logging.getLogger("clients")

#: Reconnect after 0, 2, 5, 10, then every 30 seconds (PROTOCOL.md §3.4).
DEFAULT_RECONNECT_DELAYS: Final[tuple[float, ...]] = (0.0, 2.0, 5.0, 10.0, 30.0)
#: Kicks after which reconnecting would be wrong: another connection took
#: our place, the token is gone, or we would push out another device.
TERMINAL_KICKS: Final = frozenset({"replaced", "revoked", "too_many_devices"})
#: Requests that may simply be repeated on the next connection when the
#: connection drops before their reply (reads, and writes that are idempotent).
RETRYABLE_OPS: Final = frozenset(
    {
        "ping",
        "sync",
        "history",
        "read",
        "recv",
        "delete",
        "conv_set",
        "friends",
        "friend_requests",
        "presence",
        "presence_query",
        "group_info",
        "groups",
        "notices",
        "notice_read",
        "block",
        "unblock",
    }
)
# A connection that stayed up this long restarts the reconnect schedule.
_STABLE_AFTER: Final = 5.0


_DEFAULT: Final = DEFAULT


class _Lost(Exception):
    """Internal: the connection a request was written on is gone."""


#: Runs in the reader as an ``ok`` reply arrives, before any later frame.
_OnOk: TypeAlias = "Callable[[_Connection, dict[str, Any]], None]"


class _Pending:
    """A request waiting for its reply on one connection."""

    __slots__ = ("done", "lost", "on_ok", "op", "reply")

    def __init__(self, op: str, on_ok: _OnOk | None = None) -> None:
        self.op = op
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.lost = False
        self.on_ok = on_ok

    def fail(self) -> None:
        self.lost = True
        self.done.set()


class _OutboxEntry:
    """A ``send`` not acknowledged yet; it survives reconnects."""

    __slots__ = ("cid", "conn", "done", "error", "frame", "reply", "waiters")

    def __init__(self, cid: str, frame: dict[str, Any]) -> None:
        self.cid = cid
        self.frame = frame
        self.conn: _Connection | None = None
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.waiters = 0

    def fail(self) -> None:
        """The connection died: the supervisor writes it again on the next one."""


class _Connection:
    """One transport, its in-flight requests and its fate."""

    _ids = itertools.count(1)

    def __init__(self, transport: Transport, nursery: trio.Nursery) -> None:
        self.id = next(self._ids)
        self.transport = transport
        self.nursery = nursery
        self.write_lock = trio.Lock()
        self.pending: dict[int, _Pending | _OutboxEntry] = {}
        self.closed = trio.Event()
        self.close_reason = ""
        self.close_code: int | None = None
        self.kicked: str | None = None
        self.authenticated = False
        self.opened_at = trio.current_time()

    def mark_closed(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        pending, self.pending = self.pending, {}
        for p in pending.values():
            p.fail()

    async def write(self, frame: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise _Lost
        async with self.write_lock:
            if self.closed.is_set():
                raise _Lost
            try:
                await self.transport.send(frame)
            except TransportClosed as exc:
                self.mark_closed(f"write failed: {exc}")
                raise _Lost from None


def _drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class Client(Operations):
    """A connection to imserver that reconnects, resends and fills gaps by itself.

    Create it, then :meth:`start` it in a nursery (or use :func:`open_client`),
    then authenticate with :meth:`login`, :meth:`register` or :meth:`auth`.

    Args:
        host: Server host.
        port: The TCP port, or the WebSocket port with ``transport="ws"``
            (default 7700 / 7701).
        transport: ``"tcp"`` or ``"ws"``.
        encoding: ``"msgpack"``, or ``"json"`` (WebSocket only).
        ws_path: The WebSocket path.
        device: The device name sent with ``login``/``auth`` (one connection
            per user and device, PROTOCOL.md §3.5).
        request_timeout: Default timeout of every request but ``send``
            (seconds; ``None`` waits forever).
        send_timeout: Default timeout of :meth:`send`, which otherwise waits
            across reconnects until the message is acknowledged.
        connect_timeout: Bound on opening one connection.
        heartbeat: Seconds between pings; ``None`` uses the server's value
            from the ``auth`` reply (30).
        pong_timeout: Reconnect when a ping gets no pong within this.
        reconnect_delays: Delays before successive reconnect attempts; the
            last one repeats. The schedule restarts once a connection has
            stayed up for 5 seconds.
        max_events: Bound of the event channel and of the reader's queue.
        max_outbox: Bound on unacknowledged sends; :meth:`send` waits for room.
        cursors: Highest ``seq`` the application already has, per
            conversation (e.g. saved from :attr:`cursors` last time): those
            conversations are caught up from there.
        retry_sends: Retry a ``send`` answered ``unavailable`` or
            ``rate_limited`` (after ``retry_after``) instead of raising.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        transport: TransportKind = "tcp",
        encoding: Encoding = "msgpack",
        ws_path: str = "/ws",
        device: str = "default",
        request_timeout: float | None = 10.0,
        send_timeout: float | None = None,
        connect_timeout: float = 10.0,
        heartbeat: float | None = None,
        pong_timeout: float = 10.0,
        reconnect_delays: Sequence[float] = DEFAULT_RECONNECT_DELAYS,
        max_events: int = 1000,
        max_outbox: int = 1000,
        cursors: Mapping[str, int] | None = None,
        retry_sends: bool = True,
    ) -> None:
        if transport == "tcp" and encoding != "msgpack":
            raise ValueError("TCP carries MessagePack only; use transport='ws' for JSON")
        if not reconnect_delays:
            raise ValueError("reconnect_delays must not be empty")
        self.host = host
        self.port = port if port is not None else (7700 if transport == "tcp" else 7701)
        self.transport_kind: TransportKind = transport
        self.encoding: Encoding = encoding
        self.ws_path = ws_path
        self.device = device
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.pong_timeout = pong_timeout
        self.reconnect_delays = tuple(reconnect_delays)
        self.retry_sends = retry_sends
        #: The authenticated user (after login/register/auth).
        self.user: str | None = None
        #: The session token (after login/register/auth); reused on reconnect.
        self.token: str | None = None
        #: The reply of the last successful authentication.
        self.session: dict[str, Any] = {}
        #: Connections authenticated after the first one.
        self.reconnects = 0
        #: Connections closed because a ping got no pong in time.
        self.heartbeat_failures = 0
        #: Pushes other than messages dropped because the application lagged.
        self._rids = itertools.count(1)
        self._conn: _Connection | None = None
        self._ready = False  # self._conn is authenticated and the outbox rewritten
        self._state = trio.Event()  # set (and replaced) on every state change
        self._closed_reason: str | None = None
        self._connect_error: str | None = None
        self._logging_out = False
        self._outbox: dict[str, _OutboxEntry] = {}
        self._outbox_slots = trio.Semaphore(max_outbox)
        self._delivery = Delivery(
            max_events, cursors, sync=self._sync_for_delivery, history=self._history_for_delivery
        )
        self._cancel_scope: trio.CancelScope | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the background tasks in ``nursery`` and begin connecting.

        Call :meth:`aclose` before the nursery ends (or cancel it).
        """
        await nursery.start(self._run)

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._supervise)
                    nursery.start_soon(self._delivery.run)
                    task_status.started()
            finally:
                self._terminate(self._closed_reason or "closed")

    async def aclose(self) -> None:
        """Close the connection and stop; pending requests raise :class:`ClientClosed`."""
        self._terminate("closed")
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    @property
    def closed_reason(self) -> str | None:
        """Why the client stopped for good (``None`` while it is running)."""
        return self._closed_reason

    @property
    def connected(self) -> bool:
        """Whether an authenticated connection is up right now."""
        return self._ready and self._conn is not None and not self._conn.closed.is_set()

    @property
    def cursors(self) -> dict[str, int]:
        """A copy of the highest ``seq`` delivered to the application, per conversation."""
        return dict(self._delivery.cursors)

    @property
    def dropped_pushes(self) -> int:
        """Pushes other than messages dropped because the application lagged."""
        return self._delivery.dropped_pushes

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """The stream of :class:`Message` and :class:`Push` events.

        Use as ``async for event in client.events(): ...``. It ends when the
        client closes. It is bounded: a consumer that stops reading makes the
        client drop pushes it cannot queue (messages are fetched again later).
        """
        return self._delivery.events

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event, or :class:`RequestTimeout` after ``timeout`` seconds."""
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                return await self._delivery.events.receive()
        except trio.TooSlowError:
            raise RequestTimeout("next_event", timeout or 0.0) from None
        except trio.EndOfChannel:
            raise ClientClosed(self._closed_reason or "closed") from None

    def _notify(self) -> None:
        self._state.set()
        self._state = trio.Event()

    def _terminate(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            log.info("client closed: %s", reason)
        self._ready = False
        if self._conn is not None:
            self._conn.mark_closed(reason)
        for entry in list(self._outbox.values()):
            if not entry.done.is_set():
                entry.error = ClientClosed(self._closed_reason)
                entry.done.set()
        self._delivery.close()
        self._notify()

    # ------------------------------------------------------------ supervisor

    async def _supervise(self) -> None:
        attempt = 0
        while self._closed_reason is None:
            if attempt:
                delay = self.reconnect_delays[min(attempt - 1, len(self.reconnect_delays) - 1)]
                await trio.sleep(delay)
            conn = await self._connection_once()
            if self._closed_reason is not None:
                return
            if conn is None:
                attempt += 1
                continue
            if conn.authenticated and trio.current_time() - conn.opened_at >= _STABLE_AFTER:
                attempt = 1  # immediately, then 2, 5, ...
            else:
                attempt += 1
            if conn.kicked in TERMINAL_KICKS:
                self._terminate(conn.kicked)
            elif self._logging_out and conn.authenticated:
                self._terminate("logout")

    async def _connection_once(self) -> _Connection | None:
        """Open one connection and keep it until it closes; None if it never opened."""
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self.connect_timeout):
                    transport = await open_transport(
                        nursery,
                        self.host,
                        self.port,
                        kind=self.transport_kind,
                        encoding=self.encoding,
                        path=self.ws_path,
                    )
            except (OSError, trio.TooSlowError) as exc:
                self._connect_error = f"cannot connect to {self.host}:{self.port}: {exc}"
                log.info("%s", self._connect_error)
                self._notify()
                nursery.cancel_scope.cancel()
                return None
            self._connect_error = None
            conn = _Connection(transport, nursery)
            nursery.start_soon(self._reader, conn)
            try:
                if self.token is not None:
                    await self._reauthenticate(conn)
                else:
                    self._conn = conn  # raw: login/register/auth may use it
                    self._notify()
                await conn.closed.wait()
            finally:
                was_ready = self._ready and self._conn is conn
                if self._conn is conn:
                    self._conn = None
                    self._ready = False
                conn.mark_closed("closing")
                self._notify()
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await transport.aclose()
            if was_ready and self._closed_reason is None:
                self._enqueue(
                    Push(
                        "disconnected",
                        {
                            "op": "disconnected",
                            "reason": conn.close_reason,
                            "code": conn.close_code,
                        },
                    )
                )
            return conn

    async def _reauthenticate(self, conn: _Connection) -> None:
        assert self.token is not None
        frame = {"op": "auth", "token": self.token, "device": self.device}
        try:
            with trio.fail_after(self._timeout_value(_DEFAULT)):
                await self._roundtrip(conn, frame, on_ok=self._on_authenticated)
        except Unauthorized:
            log.warning("the server refused our token; giving up")
            self._terminate("unauthorized")
            conn.mark_closed("token refused")
            return
        except (RequestError, _Lost, trio.TooSlowError) as exc:
            log.info("re-authentication failed: %r", exc)
            conn.mark_closed(f"auth failed: {exc!r}")
            return
        await self._activate(conn)

    def _on_authenticated(self, conn: _Connection, reply: dict[str, Any]) -> None:
        """Runs in the reader as the auth reply arrives, before any later push."""
        conn.authenticated = True
        first = not self.session
        self.session = reply
        self.user = str(reply.get("user", self.user or ""))
        token = reply.get("token")
        if isinstance(token, str):
            self.token = token
        if not first:
            self.reconnects += 1
        self._enqueue(Resync())
        self._enqueue(
            Push("connected", {"op": "connected", "user": self.user, "reconnect": not first})
        )

    async def _activate(self, conn: _Connection) -> None:
        """After auth: rewrite every unacknowledged send, then serve requests."""
        self._conn = conn
        try:
            while True:
                todo = [e for e in self._outbox.values() if e.conn is not conn]
                if not todo:
                    break
                for entry in todo:
                    if entry.done.is_set():
                        continue
                    await self._write_entry(conn, entry)
        except _Lost:
            return
        if conn.closed.is_set() or self._closed_reason is not None:
            return
        self._ready = True
        self._notify()
        conn.nursery.start_soon(self._heartbeat, conn)

    async def _heartbeat(self, conn: _Connection) -> None:
        interval = self.heartbeat
        if interval is None:
            interval = float(self.session.get("heartbeat", 30))
        while not conn.closed.is_set():
            await trio.sleep(interval)
            try:
                with trio.move_on_after(self.pong_timeout) as scope:
                    await self._roundtrip(conn, {"op": "ping"})
            except _Lost:
                return
            except RequestError as exc:
                log.info("ping refused: %s", exc)
                continue
            if scope.cancelled_caught:
                self.heartbeat_failures += 1
                log.info("no pong within %ss; reconnecting", self.pong_timeout)
                conn.mark_closed("no pong")
                return

    # ------------------------------------------------------------ reader

    async def _reader(self, conn: _Connection) -> None:
        try:
            while True:
                frame = await conn.transport.receive()
                self._dispatch(conn, frame)
        except TransportClosed as exc:
            conn.close_code = exc.code
            conn.mark_closed(str(exc))

    def _dispatch(self, conn: _Connection, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        rid = frame.get("rid")
        if rid is not None and op in ("ok", "error", "pong"):
            pending = conn.pending.pop(rid, None)
            if isinstance(pending, _OutboxEntry):
                self._send_replied(pending, frame)
            elif pending is not None:
                pending.reply = frame
                if op == "ok":
                    if pending.on_ok is not None:
                        pending.on_ok(conn, frame)
                    self._hint(frame)
                pending.done.set()
            return
        if op == "kicked":
            conn.kicked = str(frame.get("reason", ""))
            log.info("kicked: %s", conn.kicked)
        if op == "msg":
            try:
                item: Item = Message.from_frame(frame)
            except (KeyError, TypeError, ValueError):
                log.warning("malformed msg push: %r", frame)
                return
        else:
            item = Push(str(op), frame)
        self._enqueue(item)

    def _hint(self, reply: Mapping[str, Any]) -> None:
        conv, seq, mid = reply.get("conv"), reply.get("seq"), reply.get("mid")
        if isinstance(conv, str) and isinstance(seq, int) and isinstance(mid, int):
            self._enqueue(Hint(conv, seq))

    def _enqueue(self, item: Item) -> None:
        self._delivery.enqueue(item)

    def _send_replied(self, entry: _OutboxEntry, frame: dict[str, Any]) -> None:
        log.debug("send %s answered: %r", entry.cid, frame)
        if entry.done.is_set():
            return
        entry.reply = frame
        entry.done.set()
        if self._outbox.get(entry.cid) is entry:
            del self._outbox[entry.cid]
            self._outbox_slots.release()
        if frame.get("op") != "ok":
            return
        f = entry.frame
        try:
            own = Message(
                mid=int(frame["mid"]),
                conv=str(frame["conv"]),
                seq=int(frame["seq"]),
                sender=self.user or "",
                kind=str(f.get("kind", "text")),
                body=str(f.get("body", "")),
                ts=int(frame["ts"]),
                meta=f.get("meta"),
                mentions=f.get("mentions"),
                reply_to=f.get("reply_to"),
                cid=entry.cid,
                raw={"op": "msg", **frame, "from": self.user, "cid": entry.cid},
            )
        except (KeyError, TypeError, ValueError):
            log.warning("malformed send reply: %r", frame)
            return
        self._enqueue(own)

    async def _sync_for_delivery(self) -> list[dict[str, Any]]:
        return await self.sync(timeout=None)

    async def _history_for_delivery(self, conv: str, after: int, limit: int) -> History:
        return await self.history(conv, after_seq=after, limit=limit)

    # ------------------------------------------------------------ requests

    def _timeout_value(self, timeout: Timeout) -> float:
        t = self.request_timeout if isinstance(timeout, _Default) else timeout
        return math.inf if t is None else t

    async def _wait_ready(self) -> _Connection:
        while True:
            if self._closed_reason is not None:
                raise ClientClosed(self._closed_reason)
            conn = self._conn
            if self._ready and conn is not None and not conn.closed.is_set():
                return conn
            await self._state.wait()

    async def _wait_connected(self) -> _Connection:
        """A connection to authenticate on (the supervisor re-authenticates by itself)."""
        while True:
            if self._closed_reason is not None:
                raise ClientClosed(self._closed_reason)
            conn = self._conn
            if conn is not None and not conn.closed.is_set():
                if not conn.authenticated and self.token is None:
                    return conn  # a fresh connection
                if conn.authenticated and self._ready:
                    return conn  # already authenticated: the server says conflict
            if self._connect_error is not None and self.token is None:
                raise ConnectionLost(self._connect_error)
            await self._state.wait()

    async def _roundtrip(
        self, conn: _Connection, frame: dict[str, Any], on_ok: _OnOk | None = None
    ) -> dict[str, Any]:
        if conn.closed.is_set():
            raise _Lost
        rid = next(self._rids)
        pending = _Pending(str(frame["op"]), on_ok)
        conn.pending[rid] = pending
        try:
            await conn.write({**frame, "rid": rid})
            await pending.done.wait()
        finally:
            conn.pending.pop(rid, None)
        if pending.lost or pending.reply is None:
            raise _Lost
        reply = pending.reply
        if reply.get("op") == "error":
            raise error_from_frame(reply, pending.op)
        return reply

    async def request(
        self, op: str, *, timeout: Timeout = _DEFAULT, **fields: Any
    ) -> dict[str, Any]:
        """Send any request and return its ``ok`` reply (fields ``None`` are left out).

        Reads and idempotent writes (:data:`RETRYABLE_OPS`) are repeated on
        the next connection when the connection drops before their reply.

        Args:
            op: The operation.
            timeout: Seconds to wait, reconnecting included (default
                ``request_timeout``; ``None`` waits forever).
            **fields: The request's fields.

        Returns:
            The reply frame (``op`` is ``"ok"`` or ``"pong"``).

        Raises:
            RequestError: The server refused (a subclass per code).
            RequestTimeout: No reply in time.
            ConnectionLost: The connection dropped and ``op`` is not retryable.
            ClientClosed: The client is closed.
        """
        frame = {"op": op, **_drop_none(fields)}
        limit = self._timeout_value(timeout)
        try:
            with trio.fail_after(limit):
                while True:
                    conn = await self._wait_ready()
                    try:
                        return await self._roundtrip(conn, frame)
                    except _Lost:
                        if self._closed_reason is not None:
                            raise ClientClosed(self._closed_reason) from None
                        if op not in RETRYABLE_OPS:
                            raise ConnectionLost(f"{op}: connection lost") from None
        except trio.TooSlowError:
            raise RequestTimeout(op, limit) from None

    # ------------------------------------------------------------ session (§3)

    async def _authenticate(self, frame: dict[str, Any], timeout: Timeout) -> dict[str, Any]:
        limit = self._timeout_value(timeout)

        def on_ok(conn: _Connection, reply: dict[str, Any]) -> None:
            if frame["op"] == "auth":
                self.token = str(frame["token"])
            self._on_authenticated(conn, reply)

        try:
            with trio.fail_after(limit):
                conn = await self._wait_connected()
                try:
                    reply = await self._roundtrip(conn, frame, on_ok=on_ok)
                except _Lost:
                    raise ConnectionLost(f"{frame['op']}: connection lost") from None
                await self._activate(conn)
                return reply
        except trio.TooSlowError:
            raise RequestTimeout(str(frame["op"]), limit) from None

    async def login(
        self, user: str, password: str, *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Log in with a password; the reply's ``token`` is kept for reconnects.

        Returns:
            ``{"user", "device", "heartbeat", "server_time", "token", ...}``.
        """
        self.user = user
        frame = {"op": "login", "user": user, "password": password, "device": self.device}
        return await self._authenticate(frame, timeout)

    async def register(
        self, user: str, password: str, *, timeout: Timeout = _DEFAULT
    ) -> dict[str, Any]:
        """Create the user and log in (when the server allows open registration)."""
        self.user = user
        frame = {"op": "register", "user": user, "password": password, "device": self.device}
        return await self._authenticate(frame, timeout)

    async def auth(self, token: str, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """Authenticate with a token from an earlier ``login``/``register``."""
        frame = {"op": "auth", "token": token, "device": self.device}
        return await self._authenticate(frame, timeout)

    async def logout(self, *, timeout: Timeout = _DEFAULT) -> dict[str, Any]:
        """Revoke this connection's token; the server closes it and the client stops."""
        self._logging_out = True
        try:
            reply = await self.request("logout", timeout=timeout)
        except BaseException:
            self._logging_out = False
            raise
        self._terminate("logout")
        return reply

    async def ping(self, *, timeout: Timeout = _DEFAULT) -> float:
        """Round-trip a ``ping``; returns the seconds it took."""
        start = trio.current_time()
        await self.request("ping", timeout=timeout)
        return trio.current_time() - start

    # ------------------------------------------------------------ sending (§5)

    async def send(
        self,
        to: str | None = None,
        body: str = "",
        *,
        group: str | None = None,
        conv: str | None = None,
        kind: str = "text",
        meta: Mapping[str, Any] | None = None,
        mentions: Iterable[str] | None = None,
        reply_to: int | None = None,
        cid: str | None = None,
        timeout: Timeout = _DEFAULT,
    ) -> SendResult:
        """Send a message; return its committed ``mid/conv/seq/ts`` once acknowledged.

        Exactly one of ``to`` (a user), ``group`` (a gid) or ``conv``. The
        message keeps its ``cid`` (a fresh UUID unless given) across
        reconnects: if the connection drops before the reply, it is written
        again on the next connection and the server answers with the first
        commit. ``unavailable`` and ``rate_limited`` are retried after a pause
        when ``retry_sends`` is on.

        Args:
            to: The peer of a direct message.
            body: The text (at most ``max_body_bytes`` of UTF-8).
            group: The group id.
            conv: A conversation id instead.
            kind: ``text``, ``image``, ``voice``, ``video``, ``file``,
                ``location`` or ``custom``.
            meta: Optional map (media: ``url``, ``size``, ``mime``, ...).
            mentions: Users mentioned (groups only).
            reply_to: The mid this message answers.
            cid: The client message id (at most 64 chars, unique per sender).
            timeout: Seconds to wait for the acknowledgement (default
                ``send_timeout``, which is ``None``: until acknowledged or
                the client closes). On timeout the message may or may not be
                stored; send again with the same ``cid`` to find out.

        Raises:
            RequestError: The server refused (``forbidden``, ``invalid``, ...).
            RequestTimeout: No acknowledgement in time.
            ClientClosed: The client closed first.
        """
        if sum(x is not None for x in (to, group, conv)) != 1:
            raise ValueError("give exactly one of to, group, conv")
        cid = cid if cid is not None else uuid.uuid4().hex
        frame: dict[str, Any] = _drop_none(
            {
                "op": "send",
                "to": to,
                "group": group,
                "conv": conv,
                "cid": cid,
                "kind": kind,
                "body": body,
                "meta": dict(meta) if meta is not None else None,
                "mentions": list(mentions) if mentions is not None else None,
                "reply_to": reply_to,
            }
        )
        t = self.send_timeout if isinstance(timeout, _Default) else timeout
        limit = math.inf if t is None else t
        try:
            with trio.fail_after(limit):
                while True:
                    try:
                        reply = await self._send_once(cid, frame)
                    except (Unavailable, RateLimited) as exc:
                        if not self.retry_sends:
                            raise
                        pause = exc.retry_after if exc.retry_after is not None else 1.0
                        log.info("send %s: %s; retrying in %ss", cid, exc.code, pause)
                        await trio.sleep(pause)
                        continue
                    return SendResult(
                        mid=int(reply["mid"]),
                        conv=str(reply["conv"]),
                        seq=int(reply["seq"]),
                        ts=int(reply["ts"]),
                        cid=cid,
                    )
        except trio.TooSlowError:
            raise RequestTimeout("send", limit) from None

    async def _send_once(self, cid: str, frame: dict[str, Any]) -> dict[str, Any]:
        if self._closed_reason is not None:
            raise ClientClosed(self._closed_reason)
        entry = self._outbox.get(cid)
        if entry is None:
            await self._outbox_slots.acquire()
            if self._closed_reason is not None:
                self._outbox_slots.release()
                raise ClientClosed(self._closed_reason)
            entry = self._outbox.get(cid)
            if entry is None:
                entry = _OutboxEntry(cid, frame)
                self._outbox[cid] = entry
            else:
                self._outbox_slots.release()
        entry.waiters += 1
        try:
            conn = self._conn
            if self._ready and conn is not None and entry.conn is None:
                with contextlib.suppress(_Lost):
                    await self._write_entry(conn, entry)
            await entry.done.wait()
        finally:
            entry.waiters -= 1
            # Abandoned (timeout or cancellation): stop resending it.
            abandoned = not entry.done.is_set() and entry.waiters == 0
            if abandoned and self._outbox.get(cid) is entry:
                del self._outbox[cid]
                self._outbox_slots.release()
        if entry.error is not None:
            raise entry.error
        reply = entry.reply
        assert reply is not None
        if reply.get("op") == "error":
            raise error_from_frame(reply, "send")
        return reply

    async def _write_entry(self, conn: _Connection, entry: _OutboxEntry) -> None:
        rid = next(self._rids)
        entry.conn = conn
        conn.pending[rid] = entry
        log.debug("send %s on connection %d (rid %d)", entry.cid, conn.id, rid)
        await conn.write({**entry.frame, "rid": rid})

    @property
    def unacknowledged(self) -> list[str]:
        """The cids of sends written or waiting, not yet acknowledged, in order."""
        return list(self._outbox)


@contextlib.asynccontextmanager
async def open_client(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    register: bool = False,
    **options: Any,
) -> AsyncIterator[Client]:
    """A running :class:`Client`, authenticated when credentials are given.

    Args:
        host: Server host.
        port: Server port (TCP or WebSocket per ``transport``).
        user: With ``password``: log in (or ``register``).
        password: The password.
        token: Authenticate with this token instead.
        register: Create the user rather than log in.
        **options: Passed to :class:`Client` (``transport``, ``encoding``,
            ``device``, ``request_timeout``, ``reconnect_delays``, ...).

    Yields:
        The client; it is closed on exit.
    """
    client = Client(host, port, **options)
    async with trio.open_nursery() as nursery:
        await client.start(nursery)
        try:
            if token is not None:
                await client.auth(token)
            elif user is not None and password is not None:
                if register:
                    await client.register(user, password)
                else:
                    await client.login(user, password)
            yield client
        finally:
            await client.aclose()
