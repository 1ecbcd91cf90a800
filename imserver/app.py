"""The whole server as one nursery tree, built here and nowhere else.

::

    serve()
    └── root nursery
        ├── BatchWriter.run            (storage: group commit)
        ├── Hub.run_sweeps             (one heartbeat sweep per shard)
        ├── TokenLookups.run           (token checks batched per round)
        └── connections nursery        (one Session.run per client)
            ├── serve_http             (hypercorn: the HTTP shim, drains on shutdown)
            └── accept nursery
                ├── serve_listeners    (TCP)
                ├── serve_listeners    (WebSocket)
                └── signal watcher     (SIGINT/SIGTERM -> shutdown)

Shutdown (STYLE practice 6) is a deadline, not a kill: stop accepting, kick
every session with ``shutdown`` (each sends ``kicked`` and closes), give them
``server.shutdown_grace`` seconds, then flush the batch writer (shielded) and
close the pool.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import signal
from typing import Any

import trio

from protocol.errors import KickReason

from .clock import Clock
from .config import Config
from .http import serve_http
from .hub.hub import Hub
from .services.auth import AuthService
from .services.chat import ChatService
from .services.friends import FriendService
from .services.groups import GroupService
from .services.lifecycle import LifecycleService
from .services.notices import NoticeService
from .services.wechat import WeChatService
from .session import Session
from .state import ServerState, Stats
from .storage.db import Storage
from .storage.writer import BatchWriter
from .transport.tcp import TcpTransport
from .transport.websocket import WebSocketTransport

log = logging.getLogger("imserver")


@dataclasses.dataclass
class ServerInfo:
    """What :func:`serve` reports once it accepts connections."""

    tcp_port: int | None
    ws_port: int | None
    state: ServerState
    http_port: int | None = None

    def shutdown(self) -> None:
        """Begin a graceful shutdown (as SIGTERM does)."""
        self.state.shutting_down.set()


def _peer(stream: Any) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError):
        return "?"


async def serve(
    cfg: Config,
    dsn: str,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until shutdown; reports a :class:`ServerInfo` when listening."""
    clock = Clock()
    storage = Storage(
        dsn,
        pool_size=cfg.database.pool_size,
        connect_timeout=cfg.database.connect_timeout,
        query_timeout=cfg.database.query_timeout,
        writer_id=0,
    )
    await storage.open()
    try:
        applied = await storage.migrate()
        if applied:
            log.info("migrations_applied names=%s", ",".join(applied))
        await _serve(cfg, clock, storage, handle_signals, task_status)
    finally:
        await storage.aclose()


#: File descriptors kept free beyond client connections: the pool, the
#: writer's connection, listeners, logs, PostgreSQL's socket, HTTP requests.
FD_RESERVE_BASE = 64


def connection_cap(cfg: Config, nofile: tuple[int, int]) -> int:
    """Framed connections this process can hold: ``limits.max_connections``,
    lowered to fit the open-file limit ``nofile`` (soft, hard) with room for
    the pool and the HTTP shim, so a connection past it is closed at accept
    instead of the accept loop failing with EMFILE."""
    soft = nofile[0]
    if soft == resource.RLIM_INFINITY:
        return cfg.limits.max_connections
    reserve = FD_RESERVE_BASE + cfg.database.pool_size
    if cfg.http.enabled:
        reserve += cfg.http.max_requests
    return max(1, min(cfg.limits.max_connections, soft - reserve))


def _raise_nofile() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def _build_state(cfg: Config, storage: Storage, clock: Clock | None = None) -> ServerState:
    """The hub, writer and services of one server, wired together (no I/O)."""
    clock = clock or Clock()
    rate = cfg.rate
    hub = Hub(
        shards=cfg.hub.shards,
        max_devices=cfg.session.max_devices,
        max_pollers_per_user=cfg.http.max_pollers_per_user,
        max_pollers=cfg.http.max_pollers,
        heartbeat_timeout=cfg.session.heartbeat_timeout,
        sweep_interval=min(cfg.hub.sweep_interval, cfg.session.heartbeat_timeout / 4),
        limits={
            "send": (rate.send_per_s, rate.send_burst),
            "typing": (rate.typing_per_s, rate.typing_burst),
            "receipts": (rate.receipts_per_s, rate.receipts_burst),
            "requests": (rate.requests_per_s, rate.requests_burst),
            "friend_requests": (rate.friend_requests_per_h / 3600.0, rate.friend_requests_per_h),
        },
    )
    writer = BatchWriter(
        storage,
        max_rows=cfg.batch.max_rows,
        max_delay=cfg.batch.max_delay_ms / 1000.0,
        max_queue=cfg.batch.max_queue,
        commit_timeout=cfg.batch.commit_timeout,
        retry_backoff=cfg.batch.retry_backoff,
        now_ms=clock.now_ms,
    )
    auth = AuthService(storage, cfg.auth, clock)
    state = ServerState(
        cfg=cfg,
        clock=clock,
        storage=storage,
        writer=writer,
        hub=hub,
        auth=auth,
        chat=None,  # type: ignore[arg-type]
        friends=None,  # type: ignore[arg-type]
        groups=None,  # type: ignore[arg-type]
        lifecycle=None,  # type: ignore[arg-type]
        notices=None,  # type: ignore[arg-type]
        wechat=None,  # type: ignore[arg-type]
        stats=Stats(),
    )
    state.chat = ChatService(state)
    state.friends = FriendService(state)
    state.groups = GroupService(state)
    state.lifecycle = LifecycleService(state)
    state.notices = NoticeService(state)
    state.wechat = WeChatService(state)
    writer.prepare = state.groups.prepare
    writer.on_commit = state.chat.on_commit
    writer.on_failure = state.chat.on_failure
    return state


async def _serve(
    cfg: Config,
    clock: Clock,
    storage: Storage,
    handle_signals: bool,
    task_status: trio.TaskStatus[ServerInfo],
) -> None:
    state = _build_state(cfg, storage, clock)
    hub, writer = state.hub, state.writer
    await state.wechat.reconcile()
    max_connections = connection_cap(cfg, _raise_nofile())
    if max_connections < cfg.limits.max_connections:
        log.info(
            "max_connections_lowered to=%d configured=%d reason=open_file_limit",
            max_connections,
            cfg.limits.max_connections,
        )

    def over_capacity() -> bool:
        if len(state.sessions) >= max_connections:
            state.stats.error("over_capacity")
            log.warning("connection_refused reason=max_connections")
            return True
        return False

    async def tcp_handler(stream: trio.SocketStream) -> None:
        if over_capacity():
            await trio.aclose_forcefully(stream)
            return
        await Session(
            TcpTransport(stream, max_frame_bytes=cfg.limits.max_frame_bytes, peer=_peer(stream)),
            state,
        ).run()

    async def ws_handler(stream: trio.SocketStream) -> None:
        if over_capacity():
            await trio.aclose_forcefully(stream)
            return
        ws = cfg.websocket
        transport = None
        with trio.move_on_after(cfg.session.auth_timeout):
            transport = await WebSocketTransport.accept(
                stream,
                path=ws.path,
                max_frame_bytes=cfg.limits.max_frame_bytes,
                max_message_bytes=ws.max_message_bytes,
                max_handshake_bytes=ws.max_handshake_bytes,
                peer=_peer(stream),
            )
        if transport is None:
            await trio.aclose_forcefully(stream)
            return
        await Session(transport, state).run()

    async with trio.open_nursery() as root:
        await root.start(writer.run)
        await root.start(hub.run_sweeps)
        await root.start(state.auth.lookups.run)
        async with trio.open_nursery() as connections:
            http_port = None
            if cfg.http.enabled:
                # In the connections nursery: it drains its requests on shutdown.
                http_port = await connections.start(serve_http, state)
            async with trio.open_nursery() as accept:
                tcp_port = ws_port = None
                if cfg.tcp.enabled:
                    listeners = await trio.open_tcp_listeners(cfg.tcp.port, host=cfg.tcp.host)
                    tcp_port = listeners[0].socket.getsockname()[1]
                    accept.start_soon(_serve_listeners, tcp_handler, listeners, connections)
                if cfg.websocket.enabled:
                    listeners = await trio.open_tcp_listeners(
                        cfg.websocket.port, host=cfg.websocket.host
                    )
                    ws_port = listeners[0].socket.getsockname()[1]
                    accept.start_soon(_serve_listeners, ws_handler, listeners, connections)
                if handle_signals:
                    accept.start_soon(_watch_signals, state)
                state.ports.update(tcp=tcp_port, ws=ws_port, http=http_port)
                log.info(
                    "listening tcp=%s:%s ws=%s:%s http=%s:%s",
                    cfg.tcp.host,
                    tcp_port,
                    cfg.websocket.host,
                    ws_port,
                    cfg.http.host,
                    http_port,
                )
                task_status.started(ServerInfo(tcp_port, ws_port, state, http_port))
                await state.shutting_down.wait()
                accept.cancel_scope.cancel()
            log.info("shutdown_begin sessions=%d", len(state.sessions))
            for session in list(state.sessions.values()):
                session.kick(KickReason.SHUTDOWN)
            connections.cancel_scope.deadline = trio.current_time() + cfg.server.shutdown_grace
        writer.close()
        await writer.wait_closed()
        log.info("shutdown_flushed batches=%d rows=%d", writer.batches, writer.committed_rows)
        root.cancel_scope.cancel()


async def _serve_listeners(handler: Any, listeners: list[Any], nursery: trio.Nursery) -> None:
    await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _watch_signals(state: ServerState) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal_received signal=%s", signal.Signals(signum).name)
            state.shutting_down.set()
            return
