"""One connection's life: auth, heartbeat, dispatch, the outbound queue.

Theory of operation
-------------------
A session has three states (STYLE practice 2)::

    CONNECTED --auth/login/register ok--> READY --logout/kick/error--> CLOSING

``ALLOWED[state]`` lists the operations a state accepts. In CONNECTED any other
first frame gets ``unauthorized`` and the connection closes (1008 on WebSocket);
a failed ``auth``/``login`` answers ``unauthorized`` and stays open, all within
``session.auth_timeout``. In READY, ops come from :data:`HANDLERS`; unknown ops
get ``unknown_op`` (the schema decides), bad fields ``invalid``.

Two tasks per connection: the *reader* (this task) decodes frames, validates
them and calls the services; the *writer* drains the bounded outbound channel
and is the only caller of ``transport.send`` (practice 8). Replies and pushes
share the channel, so a connection sees its ``send`` replies and ``msg`` pushes
in seq order. A push that finds the channel full kicks the connection with
``slow_consumer`` (PROTOCOL §3.5): it loses nothing, it catches up with sync.

Kicks (replaced, too_many_devices, slow_consumer, revoked, shutdown, timeout)
cancel the session's scope; the end of :meth:`Session.run` then sends
``{"op":"kicked"}`` and closes with 4000 + the reason's number, shielded and
bounded in time. Heartbeats: every received frame stamps ``last_rx``; the
hub shard's sweep kicks connections silent for ``heartbeat_timeout``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from protocol import schema
from protocol.errors import (
    WS_CLOSE_AUTH,
    WS_CLOSE_NORMAL,
    WS_CLOSE_PROTOCOL,
    ErrorCode,
    FrameError,
    KickReason,
    OpError,
)

from .hub.hub import next_conn_id
from .storage.errors import StorageError, StorageUnavailable
from .storage.records import Relations
from .transport.base import FLUSH, Payload, Transport, TransportClosed

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("imserver.session")

WRITER_BATCH = 256


class State(enum.Enum):
    CONNECTED = "connected"
    READY = "ready"
    CLOSING = "closing"


AUTH_OPS = frozenset({"auth", "login", "register"})

Handler = Callable[["Session", dict[str, Any]], Awaitable[dict[str, Any] | None]]


class _Close(Exception):
    """Internal: end the session after sending ``frame`` and closing with ``code``."""

    def __init__(self, frame: dict[str, Any] | None, code: int) -> None:
        self.frame = frame
        self.code = code


class Session:
    """One client connection, from accept to close."""

    def __init__(self, transport: Transport, state: ServerState) -> None:
        self.transport = transport
        self.state = state
        self.conn_id = next_conn_id(state.cfg.server.node_id, state.storage.incarnation)
        self.user = ""
        self.device = ""
        self.token_hash: bytes | None = None
        self.relations = Relations(set(), set(), set())
        self.phase = State.CONNECTED
        self.connected_at = trio.current_time()
        self.last_rx = self.connected_at
        self.kick_reason: KickReason | None = None
        self._send, self._recv = trio.open_memory_channel[Payload](state.cfg.limits.outbound_queue)
        self._inflight = trio.Semaphore(max(1, state.cfg.limits.outbound_queue // 2))
        self._pending = 0
        self._commits_done = trio.Event()
        self._writer_done = trio.Event()
        self._nursery: trio.Nursery | None = None  # the session's, while it runs
        self._writer_started = False
        self._scope: trio.CancelScope | None = None
        self._writing = False
        self._queued = 0  # payloads in the outbound channel (or handed to the writer)
        self._direct = False  # may deliver() write to the socket itself?
        self._staged: list[Payload] | None = None  # collected during Hub.staged()
        self._attached = False

    def __repr__(self) -> str:
        who = f"{self.user}/{self.device}" if self.user else "-"
        return f"<Session {self.conn_id} {self.transport.kind} {who} {self.phase.value}>"

    @property
    def queue_depth(self) -> int:
        """Frames waiting in this connection's outbound queue (for metrics)."""
        return self._queued

    # -- called by the hub and services (never await) --------------------------

    def deliver(self, payload: Payload) -> None:
        """Send or queue a push; a full queue kicks this connection (slow_consumer).

        When nothing is queued and the writer is not writing, the push is
        written to the socket at once if the kernel takes it without blocking
        (:meth:`Transport.send_nowait`): no task switch and no queue for the
        common case of an idle connection in a fan-out. Order is kept: the
        direct path is taken only when no earlier frame is still on its way.
        """
        staged = self._staged
        if staged is not None:
            staged.append(payload)
            return
        staging = self.state.hub.staging
        if staging is not None:
            self._staged = [payload]
            staging.append(self)
            return
        if self._direct and not self._queued and not self._writing:
            done = self.transport.send_nowait(payload)
            if done:
                return
            if done is not None:
                payload = FLUSH  # written in part: the writer sends the rest
        self._enqueue(payload)

    def _start_writer(self) -> None:
        """Start the writer task when the first frame has to be queued.

        A connection whose frames all leave by direct write (an idle one:
        its auth reply, pongs and pushes) never has a writer task, about
        2 KB less memory per idle connection (``python -m bench idle``).
        Once started, the writer stays until the session ends.
        """
        nursery = self._nursery
        if not self._writer_started and nursery is not None:
            self._writer_started = True
            try:
                nursery.start_soon(self._writer)
            except RuntimeError:
                # Its last task just ended and run() has not resumed yet: the
                # session is ending, and a writer would be cancelled at once.
                pass

    def _enqueue(self, payload: Payload) -> bool:
        try:
            self._send.send_nowait(payload)
            self._queued += 1
            self._start_writer()
        except trio.WouldBlock:
            self.kick(KickReason.SLOW_CONSUMER)
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def flush_staged(self) -> None:
        """Write what :meth:`deliver` collected during ``Hub.staged()`` (one write).

        Written directly when the connection is idle, else queued for the
        writer, which sends the queue in one write too.
        """
        payloads, self._staged = self._staged, None
        if not payloads:
            return
        if self._direct and not self._queued and not self._writing:
            done = self.transport.send_many_nowait(payloads)
            if done:
                return
            if done is not None:
                self._enqueue(FLUSH)  # written in part: the writer sends the rest
                return
        for p in payloads:
            if not self._enqueue(p):
                return

    def reply(self, frame: dict[str, Any]) -> None:
        """Queue a reply frame (same queue, so order with pushes holds)."""
        self.deliver(Payload(frame))

    async def respond(self, frame: dict[str, Any]) -> None:
        """Queue a reply from the reader, waiting for room (backpressure, not a kick).

        A client that pipelines requests but reads its replies is slowed down,
        never kicked: only pushes (:meth:`deliver`) kick on a full queue.
        """
        payload = Payload(frame)
        if self._direct and not self._queued and not self._writing:
            done = self.transport.send_nowait(payload)
            if done:
                return
            if done is not None:
                payload = FLUSH
        self._queued += 1
        self._start_writer()
        try:
            await self._send.send(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queued -= 1
        except BaseException:
            self._queued -= 1
            raise

    async def acquire_inflight(self) -> None:
        """Wait for a slot for one more request answered after a commit.

        At most half the outbound queue can be owed as commit replies, so
        those replies always find room and a pipelining client is throttled
        by the reader waiting here rather than kicked.
        """
        try:
            self._inflight.acquire_nowait()  # the common case: no checkpoint per send
        except trio.WouldBlock:
            await self._inflight.acquire()
        self._pending += 1

    def release_inflight(self) -> None:
        """Give back the slot of a request whose commit reply was queued."""
        self._inflight.release()
        self._pending -= 1
        if not self._pending:
            self._commits_done.set()

    def kick(self, reason: KickReason) -> None:
        """End this connection with a ``kicked`` frame (first reason wins)."""
        if self.kick_reason is None and self.phase is not State.CLOSING:
            self._direct = False
            self.kick_reason = reason
            stats = self.state.stats
            stats.kicks[reason.value] = stats.kicks.get(reason.value, 0) + 1
            log.info("kick conn=%s user=%s reason=%s", self.conn_id, self.user, reason.value)
            if self._scope is not None:
                self._scope.cancel()

    # -- the session's life --------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; never raises but Cancelled."""
        state = self.state
        state.sessions[self.conn_id] = self
        stats = state.stats
        stats.connections[self.transport.kind] += 1
        stats.accepted_total += 1
        close_frame: dict[str, Any] | None = None
        close_code: int | None = WS_CLOSE_NORMAL
        try:
            with trio.CancelScope() as self._scope:
                if state.shutting_down.is_set():
                    self.kick_reason = KickReason.SHUTDOWN
                    self._scope.cancel()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery  # the writer starts with the first queued frame
                    try:
                        await self._reader()
                    except _Close as c:
                        close_frame, close_code = c.frame, c.code
                        await self._await_commits()
                    except TransportClosed:
                        close_code = None
                    except FrameError as e:
                        close_frame = OpError(ErrorCode.BAD_FRAME, str(e)).to_frame(None)
                        close_code = WS_CLOSE_PROTOCOL
                        stats.error("bad_frame")
                        log.info(
                            "bad_frame conn=%s peer=%s error=%s",
                            self.conn_id,
                            self.transport.peer,
                            e,
                        )
                        await self._await_commits()
                    finally:
                        nursery.cancel_scope.cancel()
        except Exception:
            # The session boundary: a bug here must not take the server down.
            log.exception("session_crashed %r", self)
            close_frame = OpError(ErrorCode.INTERNAL, "internal error").to_frame(None)
            close_code = 1011
        finally:
            self._nursery = None
            self.phase = State.CLOSING
            self._direct = False
            self._detach()
            state.sessions.pop(self.conn_id, None)
            stats.connections[self.transport.kind] -= 1
            if self.kick_reason is not None:
                close_frame = {"op": "kicked", "reason": self.kick_reason.value}
                close_code = self.kick_reason.ws_close_code
            await self._finish(close_frame, close_code)

    async def _await_commits(self) -> None:
        """Before a graceful close, let every queued reply go out, then stop the writer.

        Waits (bounded by ``batch.commit_timeout``) for the replies of sends
        already accepted, then closes the outbound channel so the writer
        drains it and returns by itself; cancelling it instead could lose a
        frame it had just taken off the queue.
        """
        with trio.move_on_after(self.state.cfg.batch.commit_timeout):
            while self._pending:
                self._commits_done = trio.Event()
                await self._commits_done.wait()
        self._direct = False  # from here on only the writer writes, then the close
        self._send.close()
        if self._writer_started:  # else nothing was ever queued
            with trio.move_on_after(1.0):
                await self._writer_done.wait()

    async def _finish(self, frame: dict[str, Any] | None, code: int | None) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                if frame is not None and not self._writing:
                    await self.transport.send([Payload(frame)])
            except TransportClosed:
                pass
            await self.transport.close(code)

    async def _writer(self) -> None:
        try:
            await self._write_loop()
        finally:
            self._writer_done.set()

    async def _write_loop(self) -> None:
        recv = self._recv
        transport = self.transport
        while True:
            try:
                batch = [await recv.receive()]
            except trio.EndOfChannel:
                return
            try:
                while len(batch) < WRITER_BATCH:
                    batch.append(recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                pass
            self._queued -= len(batch)
            self._writing = True
            try:
                await transport.send(batch)
            except TransportClosed:
                # The reader notices too; end the session quietly.
                if self._scope is not None:
                    self._scope.cancel()
                return
            self._writing = False

    async def _reader(self) -> None:
        cfg = self.state.cfg
        transport = self.transport
        with trio.move_on_after(cfg.session.auth_timeout):
            while self.phase is State.CONNECTED:
                frames = await transport.receive()
                for i, frame in enumerate(frames):
                    await self._auth_frame(frame)
                    if self.phase is State.READY:
                        for rest in frames[i + 1 :]:
                            await self._dispatch(rest)
                        break
        if self.phase is State.CONNECTED:
            self.state.stats.error("auth_timeout")
            if getattr(transport, "text", False) is None:
                raise _Close(None, WS_CLOSE_AUTH)
            raise _Close(
                OpError(ErrorCode.AUTH_TIMEOUT, "no auth in time").to_frame(None), WS_CLOSE_AUTH
            )
        while True:
            frames = await transport.receive()
            self.last_rx = trio.current_time()
            for frame in frames:
                await self._dispatch(frame)

    async def _auth_frame(self, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        rid = schema.safe_rid(frame)
        if op not in AUTH_OPS:
            self.state.stats.error("unauthorized")
            raise _Close(
                OpError(ErrorCode.UNAUTHORIZED, "authenticate first").to_frame(rid), WS_CLOSE_AUTH
            )
        try:
            frame = schema.validate(frame)
            await self._authenticate(frame)
        except OpError as e:
            self.state.stats.error(e.code.value)
            await self.respond(e.to_frame(rid))
        except StorageError as e:
            self.state.stats.error("unavailable")
            await self.respond(OpError(ErrorCode.UNAVAILABLE, str(e)).to_frame(rid))

    async def _authenticate(self, f: dict[str, Any]) -> None:
        state = self.state
        auth = state.auth
        op = f["op"]
        device = f.get("device") or "default"
        token: str | None = None
        if op == "auth":
            user, token_h = await auth.check_token(f["token"])
        else:
            user = f["user"]
            if op == "register":
                await auth.register(user, f["password"], self.transport.peer)
            else:
                await auth.check_password(user, f["password"], self.transport.peer)
            token, token_h = await auth.issue_token(user, device)
        entry = state.hub.entry(user)
        relations = entry.relations if entry is not None else await state.storage.relations(user)
        self.user, self.device, self.token_hash = user, device, token_h
        self.relations = relations
        self.phase = State.READY
        self._direct = True
        self.last_rx = trio.current_time()
        kicks, came_online = state.hub.shard(user).attach(self, relations)
        self._attached = True
        entry = state.hub.entry(user)
        if entry is not None:
            self.relations = entry.relations
        reply: dict[str, Any] = {
            "op": "ok",
            "user": user,
            "device": device,
            "heartbeat": state.cfg.session.heartbeat,
            "server_time": state.clock.now_ms(),
        }
        if "rid" in f:
            reply["rid"] = f["rid"]
        if token is not None:
            reply["token"] = token
        await self.respond(reply)
        log.info(
            "session_ready conn=%s user=%s device=%s via=%s peer=%s",
            self.conn_id,
            user,
            device,
            op,
            self.transport.peer,
        )
        for conn, reason in kicks:
            conn.kick(reason)
        if came_online:
            state.friends.announce(user, self.relations)

    def _detach(self) -> None:
        if not self._attached:
            return
        self._attached = False
        state = self.state
        went_offline = state.hub.shard(self.user).detach(self, state.clock.now_ms())
        if went_offline and not state.shutting_down.is_set():
            state.friends.announce(self.user, self.relations)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        rid = schema.safe_rid(frame)
        try:
            frame = schema.validate(frame)
            op = frame["op"]
            handler = HANDLERS.get(op)
            if handler is None:
                if op in AUTH_OPS:
                    raise OpError(ErrorCode.CONFLICT, "already authenticated")
                raise OpError(ErrorCode.UNKNOWN_OP, f"{op}: not available on this server")
            if op in LIMITED_OPS:
                wait = self.state.hub.rate("requests", self.user, trio.current_time())
                if wait:
                    raise OpError(
                        ErrorCode.RATE_LIMITED, "request rate exceeded", retry_after=round(wait, 3)
                    )
            result = await handler(self, frame)
        except OpError as e:
            self.state.stats.error(e.code.value)
            await self.respond(e.to_frame(rid))
            return
        except StorageUnavailable as e:
            self.state.stats.error("unavailable")
            await self.respond(OpError(ErrorCode.UNAVAILABLE, str(e)).to_frame(rid))
            return
        except StorageError:
            log.exception("storage_error conn=%s op=%s", self.conn_id, frame.get("op"))
            self.state.stats.error("internal")
            await self.respond(OpError(ErrorCode.INTERNAL, "internal error").to_frame(rid))
            return
        if result is not None and rid is not None:
            result["op"] = "ok"
            result["rid"] = rid
            await self.respond(result)


# -- handlers: one per op (READY state) ------------------------------------


async def _ping(s: Session, f: dict[str, Any]) -> None:
    pong: dict[str, Any] = {"op": "pong"}
    if "rid" in f:
        pong["rid"] = f["rid"]
    await s.respond(pong)
    return None


async def _logout(s: Session, f: dict[str, Any]) -> None:
    if s.token_hash is not None:
        await s.state.auth.revoke(s.token_hash)
        for conn in s.state.hub.devices(s.user):
            if conn is not s and conn.token_hash == s.token_hash:
                conn.kick(KickReason.REVOKED)
    log.info("logout conn=%s user=%s", s.conn_id, s.user)
    frame: dict[str, Any] = {"op": "ok"}
    if "rid" in f:
        frame["rid"] = f["rid"]
    raise _Close(frame, WS_CLOSE_NORMAL)


async def _send(s: Session, f: dict[str, Any]) -> None:
    await s.state.chat.send(s, f)


async def _sync(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.chat.sync(s, f)


async def _history(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.chat.history(s, f)


async def _read(s: Session, f: dict[str, Any]) -> None:
    await s.state.chat.cursor(s, f, "read")


async def _recv(s: Session, f: dict[str, Any]) -> None:
    await s.state.chat.cursor(s, f, "delivered")


async def _typing(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    await s.state.chat.typing(s, f)
    return {}


async def _friend_op(s: Session, f: dict[str, Any]) -> dict[str, Any] | None:
    return await s.state.friends.op(s, f)


async def _friends(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.friends.friends(s, f)


async def _friend_requests(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.friends.requests(s, f)


async def _presence(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    await s.state.friends.set_presence(s, f)
    return {}


async def _presence_query(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.friends.presence_query(s, f)


async def _group_change(s: Session, f: dict[str, Any]) -> None:
    await s.state.groups.change(s, f)


async def _group_info(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.groups.info(s, f)


async def _groups(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.groups.list_groups(s, f)


async def _recall(s: Session, f: dict[str, Any]) -> None:
    await s.state.lifecycle.recall(s, f)


async def _delete(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.lifecycle.delete(s, f)


async def _conv_set(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.lifecycle.conv_set(s, f)


async def _notices(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.notices.unread(s, f)


async def _notice_read(s: Session, f: dict[str, Any]) -> dict[str, Any]:
    return await s.state.notices.read(s, f)


HANDLERS: dict[str, Handler] = {
    "ping": _ping,
    "logout": _logout,
    "send": _send,
    "sync": _sync,
    "history": _history,
    "read": _read,
    "recv": _recv,
    "typing": _typing,
    "friend_request": _friend_op,
    "friend_accept": _friend_op,
    "friend_reject": _friend_op,
    "friend_remove": _friend_op,
    "block": _friend_op,
    "unblock": _friend_op,
    "friends": _friends,
    "friend_requests": _friend_requests,
    "presence": _presence,
    "presence_query": _presence_query,
    "group_create": _group_change,
    "group_update": _group_change,
    "group_dissolve": _group_change,
    "group_add": _group_change,
    "group_remove": _group_change,
    "group_leave": _group_change,
    "group_role": _group_change,
    "group_info": _group_info,
    "groups": _groups,
    "recall": _recall,
    "delete": _delete,
    "conv_set": _conv_set,
    "notices": _notices,
    "notice_read": _notice_read,
}

# Operations that query PostgreSQL inline share the "requests" rate limit; send
# (and recall, which takes from the send bucket), read/recv and typing have
# their own buckets, ping has none.
LIMITED_OPS = frozenset(HANDLERS) - {"ping", "send", "read", "recv", "typing", "logout"}

ALLOWED: dict[State, frozenset[str]] = {
    State.CONNECTED: AUTH_OPS,
    State.READY: frozenset(HANDLERS),
    State.CLOSING: frozenset(),
}
