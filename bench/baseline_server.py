"""A forward-only Trio server: the "no database" ceiling to measure beside imserver.

    python -m bench.baseline_server [--port 7710]

It speaks just enough of the protocol for ``python -m bench pairs`` over TCP:
``register``/``login``/``auth`` (always ok), ``sync`` (in-memory last seqs),
``ping``, and ``send`` (answered ``ok`` at once and forwarded as ``msg`` to the
peer's connection, with a per-conversation seq kept in memory). Nothing is
stored, nothing is validated beyond the framing. Machines of this kind differ
a lot, so imserver's figures are only meaningful next to this baseline
measured in the same run on the same machine (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import trio

from protocol.codec import NEED_DATA, FrameDecoder, frame_prefix, pack


class Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.send, self.recv = trio.open_memory_channel[bytes](8192)
        self.user = ""


async def serve(port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    users: dict[str, Conn] = {}
    last_seq: dict[str, int] = {}
    mids = itertools.count(1)

    def out(conn: Conn, frame: dict[str, Any]) -> None:
        mp = pack(frame)
        conn.send.send_nowait(frame_prefix(mp) + mp)

    async def writer(conn: Conn) -> None:
        while True:
            batch = [await conn.recv.receive()]
            try:
                while len(batch) < 256:
                    batch.append(conn.recv.receive_nowait())
            except trio.WouldBlock:
                pass
            await conn.stream.send_all(b"".join(batch))

    async def handler(stream: trio.SocketStream) -> None:
        conn = Conn(stream)
        decoder = FrameDecoder()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer, conn)
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    decoder.receive_data(data)
                    while (f := decoder.next_frame()) is not NEED_DATA:
                        handle(conn, f)  # type: ignore[arg-type]
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if users.get(conn.user) is conn:
                del users[conn.user]

    def handle(conn: Conn, f: dict[str, Any]) -> None:
        op, rid = f.get("op"), f.get("rid")
        if op == "auth":  # tokens are imserver's: make the client register/login
            out(conn, {"op": "error", "rid": rid, "code": "unauthorized", "message": "no"})
        elif op in ("register", "login"):
            conn.user = f["user"]
            users[conn.user] = conn
            out(conn, {"op": "ok", "rid": rid, "user": conn.user, "token": conn.user})
        elif op == "sync":
            convs = [{"conv": c, "last_seq": s} for c, s in last_seq.items()]
            out(conn, {"op": "ok", "rid": rid, "convs": convs})
        elif op == "ping":
            out(conn, {"op": "pong", "rid": rid})
        elif op == "send":
            to = f["to"]
            a, b = sorted((conn.user, to))
            conv = f"d:{a}:{b}"
            seq = last_seq[conv] = last_seq.get(conv, 0) + 1
            mid, ts = next(mids), int(time.time() * 1000)
            out(conn, {"op": "ok", "rid": rid, "mid": mid, "conv": conv, "seq": seq, "ts": ts})
            peer = users.get(to)
            if peer is not None:
                msg = {
                    "op": "msg",
                    "mid": mid,
                    "conv": conv,
                    "seq": seq,
                    "from": conn.user,
                    "kind": f.get("kind", "text"),
                    "body": f.get("body", ""),
                    "ts": ts,
                }
                if "meta" in f:
                    msg["meta"] = f["meta"]
                out(peer, msg)
        elif rid is not None:
            out(conn, {"op": "ok", "rid": rid})

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7710)
    trio.run(serve, p.parse_args().port)
