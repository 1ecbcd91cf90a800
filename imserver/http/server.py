"""Serving the shim: hypercorn's Trio worker, inside the server's nursery tree."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .routes import build_app

if TYPE_CHECKING:
    from ..state import ServerState

log = logging.getLogger("imserver.http")

#: Largest request line plus headers hypercorn buffers, bytes.
MAX_HEADER_BYTES = 16384


async def serve_http(
    state: ServerState, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the HTTP shim until ``state.shutting_down``; reports the bound port.

    Shutdown is graceful: hypercorn stops accepting, lets running requests
    finish for ``server.shutdown_grace`` seconds (waiting long-polls answer
    at once with no messages), then returns.
    """
    cfg = state.cfg
    hc = HypercornConfig()
    host = cfg.http.host
    hc.bind = [f"[{host}]:{cfg.http.port}" if ":" in host else f"{host}:{cfg.http.port}"]
    hc.accesslog = None  # query strings may hold the WeChat secret: never logged
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = cfg.server.shutdown_grace
    hc.h11_max_incomplete_size = MAX_HEADER_BYTES
    hc.keep_alive_timeout = cfg.http.keep_alive_s
    # Between two reads of one connection; above the longest long-poll, during
    # which hypercorn keeps reading (to see the client go away).
    hc.read_timeout = int(cfg.http.poll_max_timeout_s) + 30
    hc.include_server_header = False
    app = build_app(state)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(serve, app, hc, shutdown_trigger=state.shutting_down.wait)
        )
        port = int(binds[0].rsplit(":", 1)[1])
        log.info("http_listening host=%s port=%d", host, port)
        task_status.started(port)
