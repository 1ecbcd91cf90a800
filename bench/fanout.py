"""``python -m bench fanout``: one group of M members, K senders, every member receives.

One group of ``--members`` users (``fan0`` .. ``fan{M-1}``, ``fan0`` the owner,
made by ``group_create`` with up to 499 members, then ``group_add`` for any
more), all connected (``--transport tcp|ws|mixed``; mixed: even members TCP,
odd members binary MessagePack over WebSocket). Members ``fan0`` ..
``fan{K-1}`` are the senders: ``--rate`` messages per second in total, open
loop, each sender on a fixed schedule (rate/K per sender, phases spread
evenly); a due send goes out whether or not earlier ones were acknowledged.
Every message's body starts with its *scheduled* time (``perf_counter_ns`` as
text), so each receiving member measures scheduled-send -> receive latency
(no coordinated omission: a server stall shows as latency).

The generator is one Python process; receiving ~100k frames/s is its
bottleneck, so the receive side is frugal:

* No task per connection: all member sockets are registered in a private
  ``epoll`` whose own file descriptor is waited on by one Trio task (the
  *pump*); one wake-up serves every socket that is ready.
* WebSocket is a minimal client (handshake, masked sends, unmasked
  server frames parsed by hand), not trio-websocket.
* TCP frames are split by their length prefix, WebSocket frames by their
  header (a binary message holding several maps is split with msgpack's
  ``skip``). Every member gets the *same bytes* for one group message (the
  server encodes a push once), so each distinct map is decoded once and
  cached by its raw bytes; for every other member a frame costs a slice, a
  dict lookup and the seq check. Every member's every frame is still checked.

Correctness, per member: the seqs of the group conversation must arrive as
base+1, base+2, ... (``base`` = the conversation's last seq after setup; a
sender sees its own messages as ``ok`` replies, in the same seq stream).
``gaps`` counts seqs skipped when a jump happened, ``out_of_order`` skipped
seqs that arrived later, ``dups`` seqs seen again, ``missing`` acked messages
a member (not kicked) had not received by the end of the drain. Any of these
is a failure (exit 1), except that ``missing`` of an overloaded run (sends
unanswered, or deliveries still queued when the drain ran out) is reported as
``undelivered_backlog`` instead: the server's backlog, not a proven loss.
``slow_consumer`` and other kicks are counted; a kicked member's missing
messages are reported apart (``missing_kicked``): the
protocol lets a kicked connection catch up with ``sync``.
"""

from __future__ import annotations

import argparse
import array
import base64
import bisect
import contextlib
import errno
import os
import secrets
import select
import socket
import struct
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import trio

from protocol.codec import pack

from . import common
from .common import NS, BenchError, Closed, now_ns, trio_deadline

USER_PREFIX = "fan"
CREATE_MAX = 499  # members listed in group_create (the owner makes 500)
ADD_CHUNK = 100
AUTH_CONCURRENCY = 8
LAG_PROBE_S = 0.01
LOOP_LAG_SATURATED_MS = 10.0  # event-loop lag p99 above this: the generator is behind
_LEN = struct.Struct(">I")
_IGNORE = (-1, 0)  # cache value of a frame that is not part of the measurement


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--members", type=int, default=500, help="group members, owner included (default 500)"
    )
    p.add_argument(
        "--senders", type=int, default=4, help="members that send, fan0..fan{K-1} (default 4)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="total messages/s over all senders, open loop (default 200)",
    )
    p.add_argument(
        "--transport",
        choices=("tcp", "ws", "mixed"),
        default="mixed",
        help="tcp, ws (binary MessagePack), mixed: even members tcp, odd ws (default mixed)",
    )
    p.add_argument(
        "--body-bytes",
        type=int,
        default=32,
        help="message body size; the body starts with the send time (default 32)",
    )
    p.add_argument(
        "--ws-port",
        type=int,
        default=None,
        help="WebSocket port (default 7701; --port is the TCP port)",
    )


# ------------------------------------------------------------ connections


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """One client-to-server WebSocket frame: FIN, masked (RFC 6455 §5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = secrets.token_bytes(4)
    if n:
        mask = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + key + payload


def _split_maps(payload: bytes) -> list[bytes]:
    """The raw bytes of each MessagePack map packed back to back in ``payload``."""
    up = msgpack.Unpacker(max_buffer_size=len(payload) + 1)
    up.feed(payload)
    out = []
    start = 0
    while start < len(payload):
        try:
            up.skip()
        except Exception as e:  # noqa: BLE001 - msgpack raises various types
            raise Closed(None, f"undecodable WebSocket message from the server: {e!r}") from None
        end = up.tell()
        out.append(payload[start:end])
        start = end
    return out


class Member:
    """One member's connection (TCP or minimal WebSocket client) and its checks."""

    __slots__ = (
        "authed",
        "base",
        "buf",
        "closed",
        "dups",
        "expected",
        "fd",
        "frag",
        "gaps",
        "holes",
        "idx",
        "inflight",
        "kicked",
        "last_ack_seq",
        "lock",
        "ooo",
        "own_seqs",
        "sock",
        "user",
        "ws",
        "ws_closed",
    )

    def __init__(self, idx: int, ws: bool) -> None:
        self.idx = idx
        self.user = f"{USER_PREFIX}{idx}"
        self.ws = ws
        self.sock: socket.socket | None = None
        self.fd = -1
        self.buf = b""
        self.frag: list[bytes] | None = None
        self.lock = trio.StrictFIFOLock()
        self.authed = False
        self.closed = False
        self.ws_closed: int | None = None
        self.kicked: str | None = None
        # seq checks
        self.base = 0
        self.expected = 1
        self.holes: set[int] = set()
        self.gaps = 0
        self.dups = 0
        self.ooo = 0
        # sender side
        self.inflight: dict[int, int] = {}
        self.last_ack_seq = 0
        self.own_seqs = 0

    @property
    def kind(self) -> str:
        return "ws" if self.ws else "tcp"

    # -- raw I/O ---------------------------------------------------------

    async def connect(self, host: str, port: int, source: str | None = None) -> None:
        """Connect (and for WebSocket, handshake); ``source``: local address to bind first."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise BenchError(f"cannot resolve {host}: {e}") from None
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            try:
                # Port chosen at connect(): one ephemeral range per source address.
                sock.setsockopt(
                    socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1
                )
                sock.bind((source, 0))
            except OSError as e:
                sock.close()
                raise BenchError(f"cannot bind to {source}: {e}") from None
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise BenchError(f"cannot connect to {host}:{port}: {os.strerror(err)}")
        if err:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                sock.close()
                raise BenchError(f"cannot connect to {host}:{port}: {os.strerror(err)}")
        self.sock = sock
        self.fd = sock.fileno()
        if self.ws:
            await self._handshake(host, port)

    async def _handshake(self, host: str, port: int) -> None:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        h = f"[{host}]" if ":" in host else host
        req = (
            f"GET /ws HTTP/1.1\r\nHost: {h}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await self.send_bytes(req.encode())
        data = b""
        with trio.move_on_after(10) as scope:
            while b"\r\n\r\n" not in data:
                chunk = await self.recv_some()
                if not chunk:
                    raise Closed(None, "EOF during the WebSocket handshake")
                data += chunk
                if len(data) > 65536:
                    raise Closed(None, "WebSocket handshake reply too long")
        if scope.cancelled_caught:
            raise Closed(None, "WebSocket handshake timed out")
        head, _, rest = data.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise Closed(None, f"WebSocket handshake refused: {status.decode(errors='replace')}")
        self.buf = rest

    async def send_bytes(self, data: bytes) -> None:
        """Write all of ``data`` (several tasks may call it: one writer at a time)."""
        sock = self.sock
        if sock is None or self.closed:
            raise Closed(None, "closed")
        lock = self.lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            view = memoryview(data)
            while view:
                try:
                    n = sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except OSError as e:
                    raise Closed(None, str(e)) from None
                view = view[n:]
        finally:
            lock.release()

    async def recv_some(self) -> bytes:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                return sock.recv(common.RECEIVE_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
            except OSError:
                return b""

    def encode(self, frames: list[dict[str, Any]]) -> bytes:
        if self.ws:
            return _ws_frame(0x2, b"".join([pack(f) for f in frames]))
        parts = []
        for f in frames:
            p = pack(f)
            parts.append(_LEN.pack(len(p)))
            parts.append(p)
        return b"".join(parts)

    # -- splitting what arrived into raw MessagePack maps ----------------------

    def split(self, data: bytes) -> list[bytes]:
        """Raw maps complete so far (TCP), or binary message payloads (WebSocket)."""
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        if not self.ws:
            unpack_from = _LEN.unpack_from
            while n - pos >= 4:
                (ln,) = unpack_from(buf, pos)
                end = pos + 4 + ln
                if end > n:
                    if ln > common.MAX_FRAME:
                        raise Closed(None, f"frame of {ln} bytes")
                    break
                out.append(buf[pos + 4 : end])
                pos = end
        else:
            while n - pos >= 2:
                b0 = buf[pos]
                ln = buf[pos + 1]
                if ln & 0x80:
                    raise Closed(None, "masked frame from the server")
                hl = 2
                if ln == 126:
                    if n - pos < 4:
                        break
                    ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    hl = 4
                elif ln == 127:
                    if n - pos < 10:
                        break
                    ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    hl = 10
                end = pos + hl + ln
                if end > n:
                    break
                payload = buf[pos + hl : end]
                pos = end
                op = b0 & 0x0F
                if op == 0x2 and b0 & 0x80 and self.frag is None:
                    out.append(payload)
                elif op in (0x1, 0x2) and not b0 & 0x80:
                    self.frag = [payload]
                elif op == 0x0 and self.frag is not None:
                    self.frag.append(payload)
                    if b0 & 0x80:
                        out.append(b"".join(self.frag))
                        self.frag = None
                elif op == 0x8:
                    self.ws_closed = (
                        int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    )
                elif op == 0x9:  # ping: the server does not send them; answer anyway
                    with contextlib.suppress(OSError):
                        assert self.sock is not None
                        self.sock.send(_ws_frame(0xA, payload))
                elif op == 0x1:
                    raise Closed(None, "text message on a binary WebSocket")
        self.buf = buf[pos:] if pos < n else b""
        return out

    # -- the request/reply interface of common.open_authed / common.request ----

    async def send_frames(self, frames: list[dict[str, Any]]) -> None:
        await self.send_bytes(self.encode(frames))

    async def receive(self) -> list[dict[str, Any]]:
        """Every frame decoded so far (setup only; the pump does the measuring)."""
        data = b""
        while True:
            frames: list[dict[str, Any]] = []
            for raw in self.split(data):
                maps = _split_maps(raw) if self.ws else [raw]
                frames.extend(msgpack.unpackb(m) for m in maps)
            if frames:
                return frames
            if self.ws_closed is not None:
                raise Closed(self.ws_closed, "WebSocket closed")
            data = await self.recv_some()
            if not data:
                raise Closed(None, "EOF")

    async def aclose(self) -> None:
        sock = self.sock
        if sock is None:
            return
        if self.ws and not self.closed:
            with trio.move_on_after(0.5), contextlib.suppress(Closed):
                await self.send_bytes(_ws_frame(0x8, (1000).to_bytes(2, "big")))
        self.closed = True
        self.sock = None
        trio.lowlevel.notify_closing(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# ---------------------------------------------------------------- worker


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.delivered = 0
        self.sent_win = 0
        self.acked_win = 0
        self.delivered_win = 0
        self.reads = 0
        self.reads_win = 0
        self.maps_win = 0
        self.bytes_win = 0
        self.decoded = 0
        self.stray = 0
        self.errors: Counter[str] = Counter()
        self.kicked: Counter[str] = Counter()
        self.closed = 0
        self.ack_lat = array.array("q")
        self.del_lat = array.array("q")
        self.sched_lag = array.array("q")
        self.loop_lag = array.array("q")
        self.acked_seqs: list[int] = []


def worker(spec: dict[str, Any], link: common.WorkerLink) -> None:
    prof_path = os.environ.get("BENCH_PROFILE")  # developer aid: cProfile of the generator
    if prof_path:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(trio.run, _run_fanout, spec, link)
        prof.dump_stats(prof_path)
    else:
        result = trio.run(_run_fanout, spec, link)
    link.result(result)


async def _group_request(owner: Member, frame: dict[str, Any]) -> dict[str, Any]:
    """A group operation by the owner; ``rate_limited`` is waited out, errors are BenchError."""
    for _ in range(10):
        reply = await common.request(owner, frame)
        if reply.get("op") == "ok":
            return reply
        code = reply.get("code")
        if code == "rate_limited":
            await trio.sleep(float(reply.get("retry_after") or 0.5))
            continue
        msg = reply.get("message")
        if code == "unknown_op":
            raise BenchError(
                f"the server does not serve {frame['op']} yet (unknown_op: {msg}); "
                "the fanout scenario needs group operations"
            )
        if code in ("too_large", "conflict"):
            raise BenchError(
                f"{frame['op']} refused ({code}: {msg}): more members than the server's "
                "groups.max_members allows; lower --members or raise it in the server config"
            )
        raise BenchError(f"{frame['op']} failed: {code}: {msg}")
    raise BenchError(f"{frame['op']}: still rate_limited after 10 tries")


async def _run_fanout(spec: dict[str, Any], link: common.WorkerLink) -> dict[str, Any]:
    host = spec["host"]
    nmembers = spec["members"]
    nsenders = spec["senders"]
    transport = spec["transport"]
    members = [
        Member(i, transport == "ws" or (transport == "mixed" and i % 2 == 1))
        for i in range(nmembers)
    ]
    senders = members[:nsenders]
    tokens: dict[str, str] = spec["tokens"]
    run_id = spec["run_id"]
    st = Stats()
    limiter = trio.CapacityLimiter(AUTH_CONCURRENCY)
    # Window bounds; far future until the parent gives t0.
    far = 1 << 62
    win = {"w0": far, "w1": far}
    cpu: dict[str, float] = {}

    # -- setup: connect and authenticate everyone, create the group.
    async def login(m: Member) -> None:
        port = spec["ws_port"] if m.ws else spec["tcp_port"]

        async def connect() -> Member:
            c = Member(m.idx, m.ws)
            await c.connect(host, port)
            return c

        conn, tok = await common.open_authed(connect, m.user, tokens.get(m.user), limiter)
        assert isinstance(conn, Member)
        m.sock, m.fd, m.buf, m.frag = conn.sock, conn.fd, conn.buf, conn.frag
        m.authed = True
        if tok and tok != tokens.get(m.user):
            link.tokens({m.user: tok})  # saved even if a later step fails

    async def keepalive() -> None:
        # Registering 500 users on a fresh data dir takes minutes: ping every
        # authenticated connection every HEARTBEAT_S (heartbeat_timeout is 45 s).
        ping = {"op": "ping"}
        while True:
            await trio.sleep(common.HEARTBEAT_S)
            for m in members:
                if m.authed and not m.closed:
                    with contextlib.suppress(Closed):
                        await m.send_bytes(m.encode([ping]))

    async def close_all() -> None:
        with trio.move_on_after(3):
            async with trio.open_nursery() as n:
                for m in members:
                    n.start_soon(m.aclose)

    async with trio.open_nursery() as background:
        background.start_soon(keepalive)
        try:
            async with trio.open_nursery() as n:
                for m in members:
                    n.start_soon(login, m)
            owner = members[0]
            others = [m.user for m in members[1:]]
            reply = await _group_request(
                owner,
                {
                    "op": "group_create",
                    "rid": 1,
                    "name": f"bench fanout {run_id}",
                    "members": others[:CREATE_MAX],
                },
            )
            gid = str(reply["group"])
            conv = str(reply.get("conv") or f"g:{gid}")
            base = int(reply.get("seq") or 0)
            rid = 2
            for i in range(CREATE_MAX, len(others), ADD_CHUNK):
                reply = await _group_request(
                    owner,
                    {
                        "op": "group_add",
                        "rid": rid,
                        "group": gid,
                        "users": others[i : i + ADD_CHUNK],
                    },
                )
                rid += 1
                base = max(base, int(reply.get("seq") or 0))
            reply = await common.request(owner, {"op": "sync", "rid": rid})
            if reply.get("op") == "ok":
                for c in reply.get("convs", []):
                    if c.get("conv") == conv:
                        base = max(base, int(c.get("last_seq") or 0))
        except BaseException:
            await close_all()
            raise
        for m in members:
            m.base = base
            m.expected = base + 1
            m.last_ack_seq = base

        # -- the pump: one task reads every member socket through a private epoll.
        cache: dict[bytes, tuple[int, int]] = {}
        cache_get = cache.get
        del_lat = st.del_lat

        def classify(m: Member, raw: bytes, now: int) -> tuple[int, int] | None:
            """Decode one map the first time it is seen; None if it is not cacheable."""
            st.decoded += 1
            try:
                f = msgpack.unpackb(raw)
            except Exception as e:  # noqa: BLE001 - any msgpack failure: the server's bug
                raise Closed(None, f"{m.user}: undecodable frame from the server: {e}") from None
            op = f.get("op") if type(f) is dict else None
            if op == "msg":
                if f.get("conv") != conv:
                    st.stray += 1
                    info = _IGNORE
                elif f.get("kind") == "system":
                    info = (int(f["seq"]), -1)
                else:
                    body = f.get("body") or ""
                    try:
                        t = int(body.partition(":")[0])
                    except ValueError:
                        t = 0
                    info = (int(f["seq"]), t if win["w0"] <= t < win["w1"] else 0)
                cache[raw] = info
                return info
            if op in ("group", "pong", "presence", "typing"):
                cache[raw] = _IGNORE
                return None
            if op == "ok":
                t = m.inflight.pop(f.get("rid"), None)
                seq = f.get("seq")
                if t is None or seq is None:
                    st.stray += 1
                    return None
                st.acked += 1
                if win["w0"] <= now < win["w1"]:
                    st.acked_win += 1
                if win["w0"] <= t < win["w1"]:
                    st.ack_lat.append(now - t)
                if seq > m.last_ack_seq:
                    m.last_ack_seq = seq
                st.acked_seqs.append(seq)
                m.own_seqs += 1
                on_seq(m, seq)
                return None
            if op == "error":
                m.inflight.pop(f.get("rid"), None)
                st.errors[str(f.get("code"))] += 1
                return None
            if op == "kicked":
                reason = str(f.get("reason"))
                st.kicked[reason] += 1
                m.kicked = m.kicked or reason
                return None
            st.stray += 1
            return None

        def on_seq(m: Member, seq: int) -> bool:
            """The seq check off the fast path; True if ``seq`` is news for ``m``."""
            exp = m.expected
            if seq == exp:
                m.expected = seq + 1
                return True
            if seq > exp:
                m.gaps += seq - exp
                m.holes.update(range(exp, seq))
                m.expected = seq + 1
                return True
            if seq <= m.base:
                return False  # setup's system entries, read late
            if seq in m.holes:
                m.holes.discard(seq)
                m.ooo += 1
                return True
            m.dups += 1
            return False

        def handle(m: Member, raws: list[bytes], now: int) -> None:
            in_win = win["w0"] <= now < win["w1"]
            n = 0
            for raw in raws:
                info = cache_get(raw)
                if info is None:
                    info = classify(m, raw, now)
                    if info is None:
                        continue
                seq, t = info
                if seq < 0:
                    continue
                if seq == m.expected:
                    m.expected = seq + 1
                elif not on_seq(m, seq):
                    continue
                if t < 0:
                    continue  # a system entry: in the seq stream, not measured
                n += 1
                if t:
                    del_lat.append(now - t)
            st.delivered += n
            if in_win:
                st.delivered_win += n
                st.maps_win += len(raws)

        def lost(m: Member) -> None:
            if not m.closed:
                m.closed = True
                st.closed += 1

        async def pump() -> None:
            ep = select.epoll()
            by_fd: dict[int, Member] = {}
            try:
                for m in members:
                    if m.sock is not None:
                        ep.register(m.fd, select.EPOLLIN)
                        by_fd[m.fd] = m
                # Frames read during setup but not consumed (pushes after a reply).
                for m in members:
                    if m.buf:
                        handle(m, m.split(b""), now_ns())
                epfd = ep.fileno()
                poll = ep.poll
                bufsize = common.RECEIVE_BYTES
                while True:
                    await trio.lowlevel.wait_readable(epfd)
                    while True:
                        events = poll(0, 64)
                        if not events:
                            break
                        for fd, _ in events:
                            m = by_fd[fd]
                            sock = m.sock
                            if sock is None:
                                ep.unregister(fd)
                                continue
                            try:
                                data = sock.recv(bufsize)
                            except BlockingIOError:
                                continue
                            except OSError:
                                data = b""
                            now = now_ns()
                            if not data:
                                ep.unregister(fd)
                                lost(m)
                                continue
                            st.reads += 1
                            if win["w0"] <= now < win["w1"]:
                                st.reads_win += 1
                                st.bytes_win += len(data)
                            try:
                                raws = m.split(data)
                                if m.ws:
                                    raws = [
                                        x
                                        for p in raws
                                        for x in ((p,) if p in cache else _split_maps(p))
                                    ]
                                handle(m, raws, now)
                            except Closed as e:
                                print(f"bench: {m.user}: {e}", file=sys.stderr)
                                ep.unregister(fd)
                                lost(m)
                            if m.ws_closed is not None:
                                ep.unregister(fd)
                                lost(m)
                        await trio.lowlevel.checkpoint()  # let the senders run
            finally:
                ep.close()

        background.start_soon(pump)
        link.ready({"connections": nmembers, "group": gid, "base_seq": base})
        t0 = await link.wait_start()
        w0 = t0 + int(spec["warmup"] * NS)
        w1 = w0 + int(spec["duration"] * NS)
        win["w0"], win["w1"] = w0, w1
        drain_end = w1 + int(common.MAX_DRAIN_S * NS)
        pad = max(0, spec["body_bytes"])

        async def sender(m: Member, k: int) -> None:
            interval = int(NS * nsenders / spec["rate"])
            t = t0 + int(k * NS / spec["rate"])
            n = 0
            lag = st.sched_lag
            inflight = m.inflight
            try:
                while t < w1:
                    now = now_ns()
                    if t > now:
                        await trio.sleep_until(trio_deadline(t))
                        now = now_ns()
                    batch = []
                    while t <= now and t < w1:
                        n += 1
                        head = f"{t}:"
                        batch.append(
                            {
                                "op": "send",
                                "rid": n,
                                "group": gid,
                                "cid": f"{run_id}.{k}.{n}",
                                "body": head + "x" * (pad - len(head)),
                            }
                        )
                        inflight[n] = t
                        if t >= w0:
                            st.sent_win += 1
                            lag.append(now - t)
                        t += interval
                    st.sent += len(batch)
                    await m.send_bytes(m.encode(batch))
            except Closed:
                pass

        async def lag_probe() -> None:
            step = int(LAG_PROBE_S * NS)
            lags = st.loop_lag
            while True:
                t = now_ns()
                await trio.sleep(LAG_PROBE_S)
                now = now_ns()
                if w0 <= t < w1:
                    lags.append(now - t - step)

        async def reporter() -> None:
            next_t = t0
            while True:
                next_t += NS // 2
                await trio.sleep_until(trio_deadline(next_t))
                recent = st.loop_lag[-50:]
                link.progress(
                    {
                        "sent": st.sent,
                        "acked": st.acked,
                        "delivered": st.delivered,
                        "errors": sum(st.errors.values()),
                        "kicked": sum(st.kicked.values()),
                        "inflight": sum(len(m.inflight) for m in senders),
                        "loop_lag_ms": (max(recent) / 1e6) if recent else 0.0,
                    }
                )

        probed = trio.Event()

        async def cpu_probe() -> None:
            await trio.sleep_until(trio_deadline(w0))
            cpu["c0"], cpu["q0"], cpu["t0"] = (
                common.cpu_seconds(),
                common.runqueue_wait_s(),
                now_ns(),
            )
            await trio.sleep_until(trio_deadline(w1))
            cpu["c1"], cpu["q1"], cpu["t1"] = (
                common.cpu_seconds(),
                common.runqueue_wait_s(),
                now_ns(),
            )
            probed.set()

        def settled() -> bool:
            if any(m.inflight for m in senders if not m.closed):
                return False
            top = max((m.last_ack_seq for m in senders), default=0)
            return all(
                m.expected > top and not m.holes for m in members if not (m.closed or m.kicked)
            )

        drained_at = None
        drain_settled = False
        with trio.move_on_at(trio_deadline(drain_end + NS)):
            async with trio.open_nursery() as n:
                for k, m in enumerate(senders):
                    n.start_soon(sender, m, k)
                n.start_soon(lag_probe)
                n.start_soon(reporter)
                n.start_soon(cpu_probe)
                await trio.sleep_until(trio_deadline(w1))
                await probed.wait()
                while now_ns() < drain_end and not settled():  # noqa: ASYNC110 - bounded poll
                    await trio.sleep(0.01)
                drained_at = now_ns()
                drain_settled = settled()
                # The parent samples the server's CPU when it sees w1 pass (it
                # polls every 50 ms): do not finish before it has.
                await trio.sleep_until(trio_deadline(w1 + NS // 4))
                n.cancel_scope.cancel()
        background.cancel_scope.cancel()
    await close_all()

    # -- the verdict per member.
    acked = sorted(st.acked_seqs)
    acked_set = set(acked)
    missing = missing_kicked = 0
    members_missing = 0
    for m in members:
        lost_n = len(acked) - bisect.bisect_left(acked, m.expected)
        lost_n += sum(1 for s in m.holes if s in acked_set)
        if m.kicked:
            missing_kicked += lost_n
        else:
            missing += lost_n
            members_missing += lost_n > 0
    cpu_pct = wait_pct = None
    if "c1" in cpu:
        wall = (cpu["t1"] - cpu["t0"]) / NS
        cpu_pct = (cpu["c1"] - cpu["c0"]) / wall * 100
        wait_pct = (cpu["q1"] - cpu["q0"]) / wall * 100
    return {
        "pid": os.getpid(),
        "group": gid,
        "base_seq": base,
        "members_tcp": sum(1 for m in members if not m.ws),
        "members_ws": sum(1 for m in members if m.ws),
        "sent": st.sent,
        "acked": st.acked,
        "delivered": st.delivered,
        "sent_win": st.sent_win,
        "acked_win": st.acked_win,
        "delivered_win": st.delivered_win,
        "reads_win": st.reads_win,
        "maps_win": st.maps_win,
        "bytes_win": st.bytes_win,
        "decoded": st.decoded,
        "errors": dict(st.errors),
        "kicked": dict(st.kicked),
        "members_kicked": sum(1 for m in members if m.kicked),
        "closed": st.closed,
        "stray": st.stray,
        "gaps": sum(m.gaps for m in members),
        "dups": sum(m.dups for m in members),
        "out_of_order": sum(m.ooo for m in members),
        "missing": missing,
        "members_missing": members_missing,
        "missing_kicked": missing_kicked,
        "unacked": sum(len(m.inflight) for m in senders),
        "drain_s": round(((drained_at or drain_end) - w1) / NS, 3),
        "drain_settled": drain_settled,
        "cpu_pct": cpu_pct,
        "runqueue_wait_pct": wait_pct,
        "ack_lat": st.ack_lat.tobytes(),
        "del_lat": st.del_lat.tobytes(),
        "sched_lag": st.sched_lag.tobytes(),
        "loop_lag": st.loop_lag.tobytes(),
    }


# ---------------------------------------------------------------- parent


def _samples(r: dict[str, Any], key: str) -> array.array[int]:
    out = array.array("q")
    out.frombytes(r[key])
    return out


def run(args: argparse.Namespace) -> int:
    if args.members < 2:
        raise BenchError("--members must be at least 2")
    if not 1 <= args.senders <= args.members:
        raise BenchError("--senders must be within 1..--members")
    if not args.rate or args.rate <= 0:
        raise BenchError("--rate must be > 0 (total messages/s)")
    if not 0 <= args.body_bytes <= 16384:
        raise BenchError("--body-bytes must be within 0..16384 (the server's max_body_bytes)")
    if args.duration <= 0 or args.warmup < 0:
        raise BenchError("--duration must be > 0 and --warmup >= 0")
    if args.warmup + args.duration > 100:
        raise BenchError("--warmup + --duration is capped at 100 s (a run stays under 2 minutes)")
    if args.plot:
        from . import plot

        plot.require()
    if args.procs != 1:
        raise BenchError("fanout runs in one load-generator process (--procs 1)")
    common.check_loopback(args.host)
    tcp_port = args.port or common.DEFAULT_PORTS["tcp"]
    ws_port = args.ws_port or common.DEFAULT_PORTS["ws"]

    env = common.environment()
    server = None
    gen_cpus, server_cpus = common.choose_cpus(args.cpu, args.server_cpu, args.spawn_server)
    try:
        if args.spawn_server:
            config = Path(args.server_config).resolve()
            server = common.SpawnedServer(config, server_cpus, host="127.0.0.1")
            common.require_spawn_host(args.host)
            tcp_port = args.port or server.tcp_port
            ws_port = args.ws_port or server.ws_port
            if (tcp_port, ws_port) != (server.tcp_port, server.ws_port):
                raise BenchError(f"--port/--ws-port are not the ports of {config}")
            common.start_server(server, config, server_cpus)
        if gen_cpus is not None:
            common.set_affinity(common.parse_cpus(gen_cpus))
        tokens = common.load_tokens()
        users = [f"{USER_PREFIX}{i}" for i in range(args.members)]
        new_users = sum(1 for u in users if u not in tokens)
        if new_users and not args.quiet:
            print(
                f"bench: {new_users} of {args.members} users have no cached token: registering "
                f"them costs one argon2 hash each on the server (~0.3 s), about "
                f"{new_users * 0.3 / 60:.0f} min",
                file=sys.stderr,
            )
        run_id = f"{int(time.time()):x}{secrets.token_hex(3)}"
        spec = {
            "transport": args.transport,
            "host": args.host,
            "tcp_port": tcp_port,
            "ws_port": ws_port,
            "members": args.members,
            "senders": args.senders,
            "rate": args.rate,
            "body_bytes": args.body_bytes,
            "warmup": args.warmup,
            "duration": args.duration,
            "run_id": run_id,
            "tokens": {u: tokens[u] for u in users if u in tokens},
        }
        prev: dict[str, Any] = {}
        timeline: list[tuple[float, float, float]] = []

        def progress_line(phase: str, t: float, latest: list[dict[str, Any]]) -> str:
            d = latest[0] if latest else {}
            dt = t - prev.get("t", 0.0) if prev else t
            rate = {
                k: (d.get(k, 0) - prev.get(k, 0)) / dt if dt > 0 else 0.0
                for k in ("acked", "delivered")
            }
            prev.update(d, t=t)
            timeline.append((t, rate["acked"], rate["delivered"]))
            return (
                f"bench {phase:7s} {t:5.1f}s  acked {rate['acked']:6,.0f}/s  "
                f"delivered {rate['delivered']:9,.0f}/s  inflight {d.get('inflight', 0):5,d}  "
                f"loop lag {d.get('loop_lag_ms', 0.0):6.1f} ms  errors {d.get('errors', 0):,d}  "
                f"kicked {d.get('kicked', 0):,d}"
            )

        try:
            results, observed = common.run_workers(
                "bench.fanout",
                [spec],
                warmup=args.warmup,
                duration=args.duration,
                setup_timeout=max(common.SETUP_TIMEOUT_S, 60 + new_users * 0.6),
                progress_line=progress_line,
                server=server,
                progress=common.Progress(not args.quiet),
                tokens=tokens,
            )
        finally:
            common.save_tokens(tokens)
    finally:
        server_exit, problems = common.stop_server(server)

    r = results[0]
    dur = args.duration
    errors: Counter[str] = Counter(r["errors"])
    kicked: Counter[str] = Counter(r["kicked"])
    ack = common.latency_summary(_samples(r, "ack_lat"))
    dlv = common.latency_summary(_samples(r, "del_lat"))
    lag = common.latency_summary(_samples(r, "sched_lag"))
    loop = common.latency_summary(_samples(r, "loop_lag"))
    gen_cpu = round(r["cpu_pct"], 1) if r["cpu_pct"] is not None else None
    loop_p99 = loop["p99"] or 0.0
    saturated = gen_cpu is not None and gen_cpu > common.SATURATED_PCT
    lagging = loop_p99 > LOOP_LAG_SATURATED_MS
    busy = observed.get("cpu_busy_pct") or {}
    foreign_gen, foreign_srv = common.foreign_cpu(
        busy,
        gen_cpus,
        server_cpus,
        gen_cpu + (observed.get("parent_cpu_pct") or 0.0) if gen_cpu is not None else None,
        observed.get("server_cpu_pct") if args.spawn_server else None,
    )
    contended = common.is_contended(foreign_gen, foreign_srv)
    # Overloaded (sends unanswered or deliveries still queued when the drain
    # ran out): acked messages not yet delivered are the server's backlog, not
    # a proven loss; they are reported apart and do not fail the run.
    overloaded = bool(r["unacked"]) or not r["drain_settled"]
    missing = 0 if overloaded else r["missing"]
    backlog = r["missing"] if overloaded else 0
    acked_per_s = r["acked_win"] / dur
    delivered_per_s = r["delivered_win"] / dur
    srv_cpu = observed.get("server_cpu_pct")

    result: dict[str, Any] = {
        "bench": "fanout",
        **env,
        "transport": args.transport,
        "members": args.members,
        "members_tcp": r["members_tcp"],
        "members_ws": r["members_ws"],
        "senders": args.senders,
        "rate": args.rate,
        "duration_s": dur,
        "warmup_s": args.warmup,
        "body_bytes": args.body_bytes,
        "loadgen_cpus": gen_cpus,
        "spawn_server": bool(args.spawn_server),
        "server_cpus": server_cpus if args.spawn_server else None,
        "fsync": True if args.spawn_server else None,
        "group": r["group"],
        "sent_per_s": round(r["sent_win"] / dur, 1),
        "acked_per_s": round(acked_per_s, 1),
        "delivered_per_s": round(delivered_per_s, 1),
        "expected_delivered_per_s": round(acked_per_s * (args.members - 1), 1),
        "delivery_latency_ms": dlv,
        "ack_latency_ms": ack,
        "sched_lag_ms": lag,
        "loop_lag_ms": loop,
        "sent": r["sent"],
        "acked": r["acked"],
        "delivered": r["delivered"],
        "errors": dict(errors),
        "kicked": dict(kicked),
        "slow_consumer_kicks": kicked.get("slow_consumer", 0),
        "members_kicked": r["members_kicked"],
        "connections_closed": r["closed"],
        "gaps": r["gaps"],
        "dups": r["dups"],
        "out_of_order": r["out_of_order"],
        "missing": missing,
        "undelivered_backlog": backlog,
        "overloaded": overloaded,
        "members_missing": 0 if overloaded else r["members_missing"],
        "missing_kicked": r["missing_kicked"],
        "unacked": r["unacked"],
        "stray_frames": r["stray"],
        "distinct_frames_decoded": r["decoded"],
        "frames_per_read": round(r["maps_win"] / r["reads_win"], 2) if r["reads_win"] else None,
        "rx_mbyte_per_s": round(r["bytes_win"] / dur / 1e6, 2),
        "drain_s": r["drain_s"],
        "setup_s": observed.get("setup_s"),
        "loadgen_cpu_pct": gen_cpu,
        "loadgen_saturated": saturated,
        "loadgen_loop_lagging": lagging,
        "loadgen_runqueue_wait_pct": (
            round(r["runqueue_wait_pct"], 1) if r["runqueue_wait_pct"] is not None else None
        ),
        "server_cpu_pct": srv_cpu,
        "server_python_cpu_pct": observed.get("server_python_cpu_pct"),
        "server_postgres_cpu_pct": observed.get("server_postgres_cpu_pct"),
        "server_runqueue_wait_pct": observed.get("server_runqueue_wait_pct"),
        "server_cpu_us_per_delivery": (
            round(srv_cpu / 100 / delivered_per_s * 1e6, 2)
            if srv_cpu is not None and delivered_per_s
            else None
        ),
        **common.contention_fields(busy, foreign_gen, foreign_srv, contended),
        "server_exit_code": server_exit,
        "server_log_problems": len(problems),
    }

    mix = f"{r['members_tcp']} tcp + {r['members_ws']} ws"
    lines = [
        f"bench fanout: {args.members} members ({mix}), {args.senders} senders, "
        f"{args.rate:,.0f} msg/s offered, {dur:g} s measured after {args.warmup:g} s warmup, "
        f"body {args.body_bytes} B",
        f"  offered    {common.fmt_rate(result['sent_per_s']):>9} msg/s   "
        f"schedule lag    {common.fmt_lat(lag)}",
        f"  acked      {common.fmt_rate(result['acked_per_s']):>9} msg/s   "
        f"send->ack       {common.fmt_lat(ack)}",
        f"  delivered  {common.fmt_rate(result['delivered_per_s']):>9} /s      "
        f"send->delivery  {common.fmt_lat(dlv)}",
        f"             (expected {common.fmt_rate(result['expected_delivered_per_s'])}/s = "
        f"acked x {args.members - 1}; {result['frames_per_read'] or 0:.1f} frames per read, "
        f"{result['rx_mbyte_per_s']:.1f} MB/s)",
        "  errors: "
        + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "none")
        + "; kicked: "
        + (", ".join(f"{k} {v}" for k, v in sorted(kicked.items())) or "none")
        + (
            f"; connections closed by server: {result['connections_closed']}"
            if result["connections_closed"]
            else ""
        ),
        f"  correctness: gaps {result['gaps']}, dups {result['dups']}, out of order "
        f"{result['out_of_order']}, missing {missing} "
        f"({result['members_missing']} members), unacked {result['unacked']}"
        + (
            f"; missing at kicked members {result['missing_kicked']}" if r["members_kicked"] else ""
        ),
    ]
    gen = "  load generator: 1 proc" + (f" on CPU {gen_cpus}" if gen_cpus else "")
    gen += f", CPU {gen_cpu if gen_cpu is not None else 0:.0f}% of a core, event-loop lag "
    gen += f"p50 {loop['p50'] or 0:.1f} p99 {loop_p99:.1f} max {loop['max'] or 0:.1f} ms"
    if srv_cpu is not None:
        gen += (
            f"; server (CPUs {server_cpus}): {srv_cpu:.0f}% "
            f"(python {result['server_python_cpu_pct']:.0f}%, "
            f"postgres {result['server_postgres_cpu_pct']:.0f}%)"
        )
    lines.append(gen)

    def fmt(x: float | None) -> str:
        return "?" if x is None else f"{x:.0f}%"

    lines.append(
        f"  other processes' CPU on the pinned CPUs: server CPUs {fmt(foreign_srv)}, "
        f"load generator CPUs {fmt(foreign_gen)}; load average "
        f"{result['loadavg_1m_before']:.1f} -> {result['loadavg_1m_after']:.1f}"
    )
    if contended:
        lines.append(
            "  WARNING: other processes competed for the pinned CPUs: figures are disturbed; "
            "rerun on a quiet machine"
        )
    if saturated:
        lines.append(
            f"  WARNING: load generator saturated (CPU above {common.SATURATED_PCT:.0f}% of a "
            "core): deliveries/s is a lower bound and latencies include the generator's backlog"
        )
    if lagging:
        lines.append(
            f"  WARNING: the generator's event loop lagged (p99 {loop_p99:.1f} ms > "
            f"{LOOP_LAG_SATURATED_MS:.0f} ms"
            + (", other processes used its CPU" if contended else "")
            + "): delivery latencies include up to that much generator delay"
        )
    bad = result["gaps"] or result["dups"] or result["out_of_order"] or missing
    if overloaded:
        lines.append(
            f"  WARNING: overloaded: after the {common.MAX_DRAIN_S:g} s drain "
            f"{r['unacked']:,} sends were unanswered and {backlog:,} deliveries of acked "
            "messages still queued (not counted as missing); latencies grow with --duration"
        )
    if bad:
        lines.append("  WARNING: correctness check failed (see counts above)")
    if r["members_kicked"]:
        lines.append(
            f"  WARNING: {r['members_kicked']} member connection(s) kicked "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kicked.items()))})"
        )
    lines += common.server_warnings(problems, server_exit)
    common.emit(result, "\n".join(lines), args.json)
    if args.plot:
        from . import plot

        ack_ms = [x / 1e6 for x in _samples(r, "ack_lat")]
        del_ms = [x / 1e6 for x in _samples(r, "del_lat")]
        title = (
            f"bench fanout: {args.members} members ({mix}), {args.rate:,.0f} msg/s offered; "
            f"{result['delivered_per_s']:,.0f} deliveries/s\n"
        )
        plot.write_run(
            args.json,
            "fanout",
            result,
            title,
            plot.ack_delivery_panels(ack_ms, del_ms, timeline),
        )
    return 1 if bad else 0
