"""Bad input end to end (acceptance item 5): real server, real PostgreSQL, real sockets.

Every case sends something malformed or abusive and checks the documented answer
(PROTOCOL.md §1-§3): the error frame and, where the protocol says so, the close.
Each case also checks that the server keeps serving: a pair of users connected
*before* the bad client exchanges messages afterwards, and every message
acknowledged to them is in ``history`` (nothing lost).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]
import pytest
import trio
import trio_websocket

from imserver.app import ServerInfo
from imserver.config import Config
from protocol.codec import FrameDecoder, encode_frame

from .client import Closed, TestClient
from .conftest import Clients, befriend, test_config

MAX_FRAME = 65536  # limits.max_frame_bytes default (PROTOCOL.md §1)
MAX_BODY = 16384  # limits.max_body_bytes default (PROTOCOL.md §5)
CONV = "d:alice:bob"

# Sends and requests are not what these tests are about: raise their limits so
# that the "still serving" exchanges never hit rate_limited. Everything else
# (frame and body limits included) keeps its documented default.
RATES = {
    "send_per_s": 10_000.0,
    "send_burst": 10_000,
    "requests_per_s": 10_000.0,
    "requests_burst": 10_000,
}
AUTH = {"login_per_user_per_min": 1000, "login_per_addr_per_min": 1000}


@pytest.fixture
def config() -> Config:
    return test_config(rate=RATES, auth=AUTH)


def cfg(**sections: dict[str, Any]) -> Config:
    """The module's config plus ``sections`` (for ``parametrize("config", ...)``)."""
    base: dict[str, dict[str, Any]] = {"rate": dict(RATES), "auth": dict(AUTH)}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return test_config(**base)


# ---------------------------------------------------------------- helpers


@dataclasses.dataclass
class Pair:
    """Two friends connected before the bad client; they prove the server still serves."""

    server: ServerInfo
    alice: TestClient
    bob: TestClient
    acked: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    n: int = 0

    async def exchange(self) -> None:
        """alice -> bob and bob -> alice, each acknowledged and pushed to the other."""
        for src, dst in ((self.alice, self.bob), (self.bob, self.alice)):
            self.n += 1
            body = f"{src.user} says {self.n}"
            r = await src.ok("send", to=dst.user, cid=f"pair-{self.n}", body=body)
            self.acked.append((r["seq"], body))
            m = await dst.push("msg")
            assert (m["seq"], m["body"], m["from"]) == (r["seq"], body, src.user)

    async def check(self, what: str = "") -> None:
        """The pair still chats, and history holds every acknowledged message."""
        try:
            await self.exchange()
            for c in (self.alice, self.bob):
                h = await c.ok("history", conv=CONV, limit=200)
                assert [(m["seq"], m["body"]) for m in h["msgs"]] == self.acked
                assert h["more"] is False
        except Closed:
            pytest.fail(f"a connection of the pair was closed after {what!r}")
        assert self.acked == [(i, b) for i, (_, b) in enumerate(self.acked, 1)]


async def make_pair(
    server: ServerInfo, clients: Clients, kinds: tuple[str, str] = ("tcp", "tcp")
) -> Pair:
    alice = await clients.user("alice", kinds[0])
    bob = await clients.user("bob", kinds[1])
    await befriend(alice, bob)
    pair = Pair(server, alice, bob)
    await pair.exchange()
    return pair


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    """Poll a server-side condition (bounded; only for state with no reply to wait on)."""
    with trio.move_on_after(timeout):
        while not cond():  # noqa: ASYNC110 - server state, no event to wait on
            await trio.sleep(0.01)
    assert cond(), f"timed out waiting for {what}"


def sessions_of(server: ServerInfo) -> int:
    return len(server.state.sessions)


def prefix(n: int) -> bytes:
    return struct.pack(">I", n)


def framed(payload: bytes) -> bytes:
    return prefix(len(payload)) + payload


async def closed(c: TestClient) -> tuple[list[dict[str, Any]], int | None]:
    """``c.closed()``, then make sure the client's socket is closed too.

    trio_websocket leaves a client's TCP stream open when the server closes first
    (it waits for the server's FIN, then ``aclose()`` returns early as the
    WebSocket is already closed), which would leak the socket (ResourceWarning).
    """
    try:
        return await c.closed()
    finally:
        if c.kind != "tcp":
            await cast(Any, c).ws._stream.aclose()


def assert_error(frame: dict[str, Any], code: str, rid: int | None = None) -> None:
    assert frame["op"] == "error", frame
    assert frame["code"] == code, frame
    assert isinstance(frame.get("message"), str), frame
    if rid is None:
        assert "rid" not in frame, frame
    else:
        assert frame["rid"] == rid, frame


def assert_closed_with(frames: list[dict[str, Any]], code: str, what: str) -> None:
    """Exactly one error frame of ``code`` came before the close."""
    assert len(frames) == 1, (what, frames)
    assert frames[0]["op"] == "error", (what, frames)
    assert frames[0]["code"] == code, (what, frames)


async def bad_client(clients: Clients, authed: bool, n: int) -> TestClient:
    if authed:
        return await clients.user(f"mallory{n}")
    return await clients.connect("tcp")


# ---------------------------------------------------------------- TCP framing


@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
async def test_oversize_length_prefix_is_refused_before_the_payload(
    server: ServerInfo, clients: Clients, authed: bool
) -> None:
    """Only the 4-byte prefix is sent: the server must answer without waiting for N bytes."""
    with trio.fail_after(15):
        pair = await make_pair(server, clients)
        for i, n in enumerate([MAX_FRAME + 1, 1 << 24, 0xFFFFFFFF]):
            bad = await bad_client(clients, authed, i)
            await bad.send_raw(prefix(n))
            with trio.fail_after(3):
                frames, _ = await closed(bad)
            assert_closed_with(frames, "bad_frame", f"length {n}")
            if authed:
                assert server.state.hub.devices(bad.user) == []
            await wait_until(lambda: sessions_of(server) == 2, "bad session to end")
            await pair.check(f"length {n}")


async def test_length_at_the_limit_is_accepted(server: ServerInfo, clients: Clients) -> None:
    """A frame of exactly max_frame_bytes is well-formed (it is not a bad_frame)."""
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        c = await clients.user("carol")
        head = msgpack.packb({"op": "ping", "rid": 7, "pad": ""})
        pad = "x" * (MAX_FRAME - len(head) - 2)  # the str header grows from 1 to 3 bytes
        payload = msgpack.packb({"op": "ping", "rid": 7, "pad": pad})
        assert len(payload) == MAX_FRAME
        await c.send_raw(framed(payload))
        assert await c.recv_frame() == {"op": "pong", "rid": 7}
        await c.ok("ping")
        await pair.check("frame of max_frame_bytes")


@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
async def test_zero_length_frame(server: ServerInfo, clients: Clients, authed: bool) -> None:
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        bad = await bad_client(clients, authed, 0)
        await bad.send_raw(prefix(0))
        with trio.fail_after(3):
            frames, _ = await closed(bad)
        assert_closed_with(frames, "bad_frame", "zero length")
        await wait_until(lambda: sessions_of(server) == 2, "bad session to end")
        await pair.check("zero length")


@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
async def test_truncated_frame_then_eof(server: ServerInfo, clients: Clients, authed: bool) -> None:
    """Half a frame, then the client shuts its write side: bad_frame, close, no crash."""
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        for i, data in enumerate(
            [
                framed(encode_frame({"op": "ping", "rid": 1})[4:])[:-1],  # one byte short
                prefix(100) + b"\x81\xa2op",  # 100 announced, 4 sent
                b"\x00\x00",  # half a length prefix
            ]
        ):
            bad = await bad_client(clients, authed, i)
            await bad.send_raw(data)
            await cast(Any, bad).stream.send_eof()
            with trio.fail_after(3):
                frames, _ = await closed(bad)
            assert_closed_with(frames, "bad_frame", repr(data))
            await wait_until(lambda: sessions_of(server) == 2, "bad session to end")
            await pair.check(f"truncated {data!r}")


# Payloads with a correct length prefix that are not exactly one map with a string op.
MALFORMED = {
    "array": msgpack.packb(["op", "ping"]),
    "int": msgpack.packb(5),
    "string": msgpack.packb("ping"),
    "nil": msgpack.packb(None),
    "map-without-op": msgpack.packb({"rid": 1, "user": "x"}),
    "op-int": msgpack.packb({"op": 5, "rid": 1}),
    "op-nil": msgpack.packb({"op": None, "rid": 1}),
    "op-bin": msgpack.packb({"op": b"ping", "rid": 1}, use_bin_type=True),
    "trailing-bytes": msgpack.packb({"op": "ping", "rid": 1}) + b"\x00",
    "two-maps": msgpack.packb({"op": "ping"}) * 2,
    "map-truncated": msgpack.packb({"op": "ping", "rid": 1})[:-1],
    "reserved-byte": b"\xc1",
    "int-key": msgpack.packb({"op": "ping", 1: 2}),
    "ext-type": msgpack.packb({"op": "ping", "x": msgpack.ExtType(1, b"abc")}),
    "nan": msgpack.packb({"op": "ping", "x": float("nan")}),
    "huge-array-header": b"\x81\xa2op\xdd\xff\xff\xff\xff",  # claims 4G entries
}


@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
async def test_payload_not_a_frame_is_bad_frame(
    server: ServerInfo, clients: Clients, authed: bool
) -> None:
    with trio.fail_after(40):
        pair = await make_pair(server, clients)
        for i, (name, payload) in enumerate(MALFORMED.items()):
            bad = await bad_client(clients, authed, i)
            await bad.send_raw(framed(payload))
            with trio.fail_after(3):
                frames, _ = await closed(bad)
            assert_closed_with(frames, "bad_frame", name)
            await wait_until(lambda: sessions_of(server) == 2, f"{name}: bad session to end")
        await pair.check("malformed payloads")


async def test_bad_frame_after_good_frames(server: ServerInfo, clients: Clients) -> None:
    """Frames served before a bad one stay served; the bad one gets bad_frame and a close."""
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        c = await clients.user("carol")
        await c.ok("ping")
        await c.ok("sync")
        await c.send_raw(framed(msgpack.packb([1, 2, 3])) + encode_frame({"op": "ping", "rid": 9}))
        with trio.fail_after(3):
            frames, _ = await closed(c)
        assert_closed_with(frames, "bad_frame", "array after pings")  # the ping after: unserved
        await pair.check("bad frame after good ones")


async def test_good_frames_before_a_bad_one_in_the_same_read_are_served(
    server: ServerInfo, clients: Clients
) -> None:
    """TCP is a stream: how the client's bytes are split into reads must not matter.

    The WebSocket transport already returns the frames decoded before a failure and
    raises it on the next call; the TCP transport must do the same.
    """
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        c = await clients.user("carol")
        data = (
            encode_frame({"op": "ping", "rid": 1})
            + encode_frame({"op": "send", "rid": 2, "to": "bob", "cid": "b4bad", "body": "x"})
            + framed(msgpack.packb([1, 2, 3]))
            + encode_frame({"op": "ping", "rid": 3})
        )
        await c.send_raw(data)  # about 60 bytes: one read on the server
        with trio.fail_after(3):
            frames, _ = await closed(c)
        await pair.check("bad frame after good ones in one read")
        assert frames[:1] == [{"op": "pong", "rid": 1}], frames
        # carol is not bob's friend: the send is answered (forbidden), not dropped.
        assert frames[1] == {
            "op": "error",
            "rid": 2,
            "code": "forbidden",
            "message": "send: not friends",
        }, frames
        assert_closed_with(frames[2:], "bad_frame", "array after pings")


async def test_random_megabyte(server: ServerInfo, clients: Clients) -> None:
    """1 MB of random bytes: whatever the prefix says, bad_frame and/or close; server fine."""
    with trio.fail_after(20):
        pair = await make_pair(server, clients)
        for _ in range(3):
            data = os.urandom(1 << 20)
            (n,) = struct.unpack(">I", data[:4])
            bad = await clients.connect("tcp")
            async with trio.open_nursery() as nursery:

                async def blast(bad: TestClient = bad, data: bytes = data) -> None:
                    try:
                        await bad.send_raw(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the server closed first: fine

                nursery.start_soon(blast)
                with trio.fail_after(5):
                    frames, _ = await closed(bad)
            # The error frame may be lost to a reset (the server closes with
            # our bytes unread), but if anything came, it is one bad_frame.
            assert len(frames) <= 1, (n, frames)
            for f in frames:
                assert_error(f, "bad_frame")
            await wait_until(lambda: sessions_of(server) == 2, "random session to end")
            await pair.check(f"random megabyte, prefix {n}")


# ---------------------------------------------------------------- session rules


@pytest.mark.parametrize(
    "frame",
    [
        {"op": "no_such_op", "rid": 1},
        {"op": "ping", "rid": 1},
        {"op": "sync", "rid": 1},
        {"op": "send", "rid": 1, "to": "bob", "cid": "x", "body": "sneaky"},
        {"op": "logout", "rid": 1},
    ],
    ids=["unknown-op", "ping", "sync", "valid-send", "logout"],
)
async def test_first_frame_not_auth_is_unauthorized_and_closes(
    server: ServerInfo, clients: Clients, frame: dict[str, Any]
) -> None:
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        bad = await clients.connect("tcp")
        await bad.send_frame(frame)
        with trio.fail_after(3):
            frames, _ = await closed(bad)
        assert len(frames) == 1, frames
        assert_error(frames[0], "unauthorized", rid=1)
        await wait_until(lambda: sessions_of(server) == 2, "bad session to end")
        await pair.check(f"first frame {frame['op']}")
        # Nothing was sent on the unauthenticated connection's behalf.
        h = await pair.bob.ok("history", conv=CONV, limit=200)
        assert "sneaky" not in [m["body"] for m in h["msgs"]]


async def test_unknown_op_after_auth_keeps_the_connection(
    server: ServerInfo, clients: Clients
) -> None:
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        c = await clients.user("carol")
        r = await c.request("no_such_op", x=1)
        assert_error(r, "unknown_op", rid=r["rid"])
        r = await c.request("x" * 5000)
        assert_error(r, "unknown_op", rid=r["rid"])
        assert len(r["message"]) < 500  # the op is not echoed whole
        # Without rid: the error comes anyway, without rid.
        await c.send_frame({"op": "no_such_op"})
        f = await c.recv_frame()
        assert_error(f, "unknown_op")
        # An auth op once authenticated is refused, the connection stays.
        r = await c.request("login", user="carol", password="password1")
        assert r["op"] == "error", r
        assert r["code"] in ("conflict", "unknown_op"), r
        await c.ok("ping")
        await c.ok("sync")
        assert server.state.hub.devices("carol") != []
        await pair.check("unknown op")


async def test_failed_login_keeps_the_connection_open(server: ServerInfo, clients: Clients) -> None:
    with trio.fail_after(15):
        pair = await make_pair(server, clients)
        c = await clients.connect("tcp")
        r = await c.request("login", user="alice", password="wrong-password")
        assert_error(r, "unauthorized", rid=r["rid"])
        r = await c.request("login", user="nobody", password="password1")
        assert_error(r, "unauthorized", rid=r["rid"])
        r = await c.request("auth", token="not-a-token", device="d")
        assert_error(r, "unauthorized", rid=r["rid"])
        # Wrong types in an auth op: invalid, still open.
        r = await c.request("login", user=5, password="password1")
        assert_error(r, "invalid", rid=r["rid"])
        r = await c.request("login", user="alice", password=["password1"])
        assert_error(r, "invalid", rid=r["rid"])
        r = await c.request("auth", token=123)
        assert_error(r, "invalid", rid=r["rid"])
        # Still unauthenticated: the correct login now works.
        r = await c.ok("login", user="alice", password="password1", device="tablet")
        assert (r["user"], r["device"]) == ("alice", "tablet")
        assert r["token"]
        c.user = "alice"
        await c.ok("ping")
        h = await c.ok("history", conv=CONV, limit=200)
        assert [(m["seq"], m["body"]) for m in h["msgs"]] == pair.acked
        await pair.check("failed logins")
        # alice's new device got the pair's two new messages too (her own with its cid).
        m1, m2 = await c.push("msg"), await c.push("msg")
        assert (m1["from"], m1["cid"], m1["body"]) == (
            "alice",
            f"pair-{pair.n - 1}",
            pair.acked[-2][1],
        )
        assert (m2["from"], m2["body"], m2["seq"]) == ("bob", pair.acked[-1][1], pair.acked[-1][0])


async def test_failed_login_then_other_op_is_unauthorized_and_closes(
    server: ServerInfo, clients: Clients
) -> None:
    with trio.fail_after(10):
        pair = await make_pair(server, clients)
        c = await clients.connect("tcp")
        r = await c.request("login", user="alice", password="wrong-password")
        assert_error(r, "unauthorized", rid=r["rid"])
        await c.send_frame({"op": "sync", "rid": 9})
        with trio.fail_after(3):
            frames, _ = await closed(c)
        assert len(frames) == 1, frames
        assert_error(frames[0], "unauthorized", rid=9)
        await pair.check("op after failed login")


@pytest.mark.parametrize("config", [cfg(session={"auth_timeout": 0.5})], ids=["auth_timeout"])
async def test_client_that_never_authenticates(server: ServerInfo, clients: Clients) -> None:
    """Silent, half-frame and failed-login clients all get auth_timeout and a close."""
    with trio.fail_after(15):
        pair = await make_pair(server, clients)
        silent = await clients.connect("tcp")
        partial = await clients.connect("tcp")
        await partial.send_raw(prefix(50) + b"\x81")  # a frame that never completes
        failed = await clients.connect("tcp")
        r = await failed.request("login", user="alice", password="wrong-password")
        assert_error(r, "unauthorized", rid=r["rid"])
        start = trio.current_time()
        for c in (silent, partial, failed):
            with trio.fail_after(3):
                frames, _ = await closed(c)
            assert len(frames) == 1, frames
            assert_error(frames[0], "auth_timeout")
        assert trio.current_time() - start < 2.0
        await wait_until(lambda: sessions_of(server) == 2, "unauthenticated sessions to end")
        await pair.check("auth timeout")


# Each: the frame (rid 1..), after auth as alice; all must answer invalid and keep the
# connection. A comment names what is wrong.
INVALID_FRAMES: list[dict[str, Any]] = [
    {"op": "send", "to": 5, "cid": "c1", "body": "x"},  # to: int
    {"op": "send", "to": "bob", "body": "x"},  # cid missing
    {"op": "send", "to": "bob", "cid": None, "body": "x"},  # cid null
    {"op": "send", "to": "bob", "cid": 7, "body": "x"},  # cid: int
    {"op": "send", "to": "bob", "cid": "", "body": "x"},  # cid empty
    {"op": "send", "to": "bob", "cid": "c" * 65, "body": "x"},  # cid too long
    {"op": "send", "to": "bob", "cid": "c2", "body": 12},  # body: int
    {"op": "send", "to": "bob", "cid": "c3", "body": ["x"]},  # body: list
    {"op": "send", "to": "bob", "cid": "c4", "body": "x", "kind": "bogus"},  # kind unknown
    {"op": "send", "to": "bob", "cid": "c5", "body": "x", "kind": "system"},  # server-only kind
    {"op": "send", "to": "bob", "conv": CONV, "cid": "c6", "body": "x"},  # to and conv
    {"op": "send", "cid": "c7", "body": "x"},  # no destination
    {"op": "send", "to": "bob", "cid": "c8", "body": "x", "meta": "m"},  # meta: str
    {"op": "send", "to": "bob", "cid": "c9", "body": "x", "reply_to": True},  # bool for int
    {"op": "send", "to": "bob", "cid": "c10", "body": "x", "reply_to": 0},  # out of range
    {"op": "send", "to": "bob", "cid": "c11", "body": "x", "reply_to": 1.5},  # float for int
    {"op": "send", "to": "bob!", "cid": "c12", "body": "x"},  # not a user name
    {"op": "send", "to": "alice", "cid": "c13", "body": "x"},  # to oneself
    {"op": "send", "conv": "nonsense", "cid": "c14", "body": "x"},  # not a conv id
    {"op": "history", "conv": CONV, "limit": 0},  # limit below 1
    {"op": "history", "conv": CONV, "limit": 201},  # limit above 200
    {"op": "history", "conv": CONV, "limit": "10"},  # limit: str
    {"op": "history", "conv": CONV, "limit": True},  # bool for int
    {"op": "history", "conv": CONV, "after_seq": 1, "before_seq": 5},  # both
    {"op": "history", "conv": CONV, "after_seq": -1},  # negative
    {"op": "history", "conv": CONV, "before_seq": "3"},  # str for int
    {"op": "history", "limit": 10},  # conv missing
    {"op": "history", "conv": 42},  # conv: int
    {"op": "read", "conv": CONV, "seq": "1"},  # seq: str
    {"op": "read", "conv": CONV, "seq": True},  # bool for int
    {"op": "read", "conv": CONV, "seq": -1},  # negative
    {"op": "read", "conv": CONV, "seq": 2**53},  # above 2^53-1
    {"op": "read", "conv": CONV},  # seq missing
    {"op": "recv", "conv": CONV, "seq": 1.0},  # float for int
    {"op": "typing", "to": "bob", "on": 1},  # int for bool
    {"op": "typing", "to": "bob"},  # on missing
    {"op": "presence", "status": "asleep"},  # not a status
    {"op": "presence", "status": 1},  # int for str
    {"op": "presence_query", "users": "bob"},  # str for list
    {"op": "presence_query", "users": ["bob", 3]},  # int in list
    {"op": "friend_request", "to": "no spaces allowed"},  # not a user name
    {"op": "friend_request", "to": "bob", "note": 5},  # note: int
    {"op": "friend_accept"},  # user missing
    {"op": "block", "user": {"name": "bob"}},  # map for user
]


async def test_wrong_field_types_are_invalid_and_keep_the_connection(
    server: ServerInfo, clients: Clients
) -> None:
    with trio.fail_after(20):
        pair = await make_pair(server, clients)
        before = await pair.bob.ok("history", conv=CONV, limit=200)
        c = await clients.connect("tcp")
        await c.ok("login", user="alice", password="password1", device="fuzz")
        c.user = "alice"
        for rid, frame in enumerate(INVALID_FRAMES, 100):
            await c.send_frame({**frame, "rid": rid})
            f = await c.recv_frame()
            assert (f["op"], f.get("rid")) == ("error", rid), (frame, f)
            assert f["code"] == "invalid", (frame, f)
            assert isinstance(f["message"], str), (frame, f)
            assert f["message"], (frame, f)
        # A bad rid is not echoed but still answered: invalid, connection open.
        for bad_rid in ["1", 1.5, True, [1]]:
            await c.send_frame({"op": "ping", "rid": bad_rid})
            f = await c.push("error")
            assert_error(f, "invalid")
        await c.ok("ping")
        after = await pair.bob.ok("history", conv=CONV, limit=200)
        assert after == {**before, "rid": after["rid"]}, "an invalid send was stored"
        assert server.state.hub.devices("alice") != []
        await pair.check("invalid fields")


async def test_out_of_range_rid_is_not_echoed(server: ServerInfo, clients: Clients) -> None:
    """An invalid rid is answered (invalid) but never echoed (schema.safe_rid)."""
    with trio.fail_after(10):
        # Before auth: Session._auth_frame echoes any int, bools included.
        c = await clients.connect("tcp")
        await c.send_frame({"op": "login", "rid": True, "user": "x", "password": "password1"})
        assert_error(await c.recv_frame(), "invalid")
        await c.login("carol")
        # After auth: Session._dispatch echoes any int but bools.
        for bad_rid in [-1, 2**53, 2**64 - 1]:
            await c.send_frame({"op": "ping", "rid": bad_rid})
            assert_error(await c.recv_frame(), "invalid")
        await c.ok("ping")


async def test_body_over_the_limit_is_too_large(server: ServerInfo, clients: Clients) -> None:
    with trio.fail_after(20):
        pair = await make_pair(server, clients)
        alice, bob = pair.alice, pair.bob
        too_large = {
            "ascii+1": "a" * (MAX_BODY + 1),
            "cjk-18000-bytes": "你" * 6000,  # 6000 chars, 18000 UTF-8 bytes
            "cjk-just-over": "你" * (MAX_BODY // 3) + "ab",  # 16383 + 2 bytes
            "emoji-just-over": "😀" * (MAX_BODY // 4) + "a",  # 16384 + 1 bytes
            "ascii-60k": "a" * 60000,  # big, but the frame still fits max_frame_bytes
        }
        for i, (name, body) in enumerate(too_large.items()):
            assert len(body.encode()) > MAX_BODY
            r = await alice.request("send", to="bob", cid=f"big{i}", body=body)
            assert_error(r, "too_large", rid=r["rid"])
            assert r["code"] == "too_large", name
        at_limit = {
            "ascii": "a" * MAX_BODY,
            "cjk": "你" * (MAX_BODY // 3) + "a",  # 16383 + 1 bytes
            "emoji": "😀" * (MAX_BODY // 4),  # 16384 bytes
        }
        for name, body in at_limit.items():
            assert len(body.encode()) == MAX_BODY, name
            r = await alice.ok("send", to="bob", cid=f"limit-{name}", body=body)
            pair.acked.append((r["seq"], body))
            m = await bob.push("msg")
            assert (m["body"], m["seq"]) == (body, r["seq"]), name
        # The refused cids were not used up: the same cid with a small body is a new message.
        r = await alice.ok("send", to="bob", cid="big0", body="small now")
        pair.acked.append((r["seq"], "small now"))
        assert (await bob.push("msg"))["body"] == "small now"
        await pair.check("bodies over the limit")


@pytest.mark.parametrize(
    "bad",
    [
        {"body": "a\x00b"},
        {"cid": "nul\x00"},
        {"body": "x", "meta": {"k": ["ok", "a\x00"]}},
        {"body": "x", "meta": {"k\x00": 1}},
    ],
    ids=["body", "cid", "meta-value", "meta-key"],
)
async def test_nul_is_invalid_and_fails_no_one_elses_send(
    server: ServerInfo, clients: Clients, bad: dict[str, Any]
) -> None:
    """PostgreSQL cannot store U+0000: refused up front, not by a failed batch.

    The bad send and a good one go out in one write, so they would share a
    batch: the good one must commit.
    """
    with trio.fail_after(20):
        pair = await make_pair(server, clients)
        alice, bob = pair.alice, pair.bob
        frames = [
            {"op": "send", "rid": 901, "to": "bob", "cid": "bad", **bad},
            {"op": "send", "rid": 902, "to": "bob", "cid": "good", "body": "fine"},
        ]
        await alice.send_raw(b"".join(encode_frame(f) for f in frames))
        replies = {}
        while len(replies) < 2:
            f = await alice.recv_frame()
            if f.get("rid") in (901, 902):
                replies[f["rid"]] = f
        assert_error(replies[901], "invalid", rid=901)
        assert "U+0000" in replies[901]["message"]
        assert replies[902]["op"] == "ok", replies[902]
        pair.acked.append((replies[902]["seq"], "fine"))
        assert (await bob.push("msg"))["body"] == "fine"
        await pair.check("after a NUL")


@pytest.mark.parametrize("config", [cfg(limits={"max_connections": 3})], ids=["max3"])
async def test_max_connections(server: ServerInfo, clients: Clients) -> None:
    with trio.fail_after(15):
        a = await clients.user("alice")
        b = await clients.user("bob")
        c = await clients.connect("tcp")
        await c.ok("register", user="carol", password="password1")
        assert sessions_of(server) == 3
        for _ in range(2):
            extra = await clients.connect("tcp")
            try:
                await extra.send_frame(
                    {"op": "register", "rid": 1, "user": "dave", "password": "password1"}
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.fail_after(2):
                frames, _ = await closed(extra)
            assert frames == []
            await extra.aclose()
        for x in (a, b, c):
            await x.ok("ping")
        await befriend(a, b)
        r = await a.ok("send", to="bob", cid="1", body="three is fine")
        assert (await b.push("msg"))["seq"] == r["seq"]
        # dave was never registered.
        r = await c.request("friend_request", to="dave")
        assert r["op"] == "error", r
        assert r["code"] in ("not_found", "forbidden"), r
        # A WebSocket connection counts too: refused before the handshake.
        assert server.ws_port is not None
        raw = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
        try:
            await raw.send_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
        except trio.BrokenResourceError:
            pass
        answer = b""
        with trio.fail_after(2):
            try:
                while chunk := await raw.receive_some(4096):
                    answer += chunk
            except trio.BrokenResourceError:
                pass
        await raw.aclose()
        assert b" 101 " not in answer, answer
        assert sessions_of(server) == 3
        # Once one leaves, a new connection is served.
        await c.aclose()
        await wait_until(lambda: sessions_of(server) == 2, "carol's session to end")
        d = await clients.user("dave")
        await d.ok("ping")
        h = await b.ok("history", conv=CONV)
        assert [m["body"] for m in h["msgs"]] == ["three is fine"]


# ---------------------------------------------------------------- slow consumer


async def raw_tcp_client(port: int, rcvbuf: int) -> TestClient:
    """A TestClient whose socket has a small receive buffer (set before connect)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    c = TestClient()
    c.kind = "tcp"
    raw = cast(Any, c)  # the attributes TestClient.tcp() sets
    raw.stream = trio.SocketStream(sock)
    raw.decoder = FrameDecoder(1 << 24)
    return c


SLOW_MAX = 1500  # sends at most; the kick comes long before on any kernel
SLOW_AFTER_KICK = 40  # sends after the kick, which must be kept for the reconnect
SLOW_BODY = 8000  # bytes of UTF-8 per message


@pytest.mark.parametrize(
    "config",
    [cfg(limits={"outbound_queue": 16}, chat={"require_friendship": False})],
    ids=["queue16"],
)
async def test_slow_consumer_is_kicked_and_loses_nothing(
    server: ServerInfo, clients: Clients
) -> None:
    """A receiver that stops reading is kicked; the sender is never held up; no loss."""
    with trio.fail_after(45):
        pair = await make_pair(server, clients)
        assert server.tcp_port is not None
        slow = await raw_tcp_client(server.tcp_port, 4096)
        clients.opened.append(slow)
        await slow.login("slowuser")
        await slow.ok("ping")
        # From here on, slowuser never reads its socket.
        sender = await clients.user("sender")
        acked: list[tuple[int, str]] = []
        window = 8  # below outbound_queue: the acks of one commit share the sender's queue
        rid = 1000
        worst = 0.0
        kicked_at: int | None = None
        while len(acked) < SLOW_MAX:
            if kicked_at is None and server.state.hub.devices("slowuser") == []:
                kicked_at = len(acked)
            if kicked_at is not None and len(acked) >= kicked_at + SLOW_AFTER_KICK:
                break
            t = trio.current_time()
            rids = {}
            for i in range(len(acked), len(acked) + window):
                rid += 1
                body = f"{i:05d}:" + chr(0x4E00 + i % 1000) * ((SLOW_BODY - 6) // 3)
                rids[rid] = body
                await sender.send_frame(
                    {"op": "send", "rid": rid, "to": "slowuser", "cid": f"s{i}", "body": body}
                )
            got_acks: dict[int, int] = {}
            while len(got_acks) < len(rids):
                f = await sender.recv_frame()
                assert f["op"] == "ok", f
                assert f["rid"] in rids, f
                got_acks[f["rid"]] = f["seq"]
            acked += [(got_acks[r], rids[r]) for r in sorted(rids)]
            # The sender is never held up by the slow receiver.
            worst = max(worst, trio.current_time() - t)
            assert worst < 3.0, f"a window of sends took {worst:.2f}s"
        assert kicked_at is not None, f"not kicked after {len(acked)} messages of {SLOW_BODY} B"
        assert [s for s, _ in acked] == list(range(1, len(acked) + 1))
        assert server.state.stats.kicks.get("slow_consumer", 0) == 1
        assert server.state.hub.devices("sender") != []  # the sender was not kicked
        # The slow socket was closed by the server: reading it ends (after whatever
        # the kernel had buffered; the kicked frame may be there or not).
        with trio.fail_after(10):
            got, _ = await closed(slow)
        msgs = [f for f in got if f["op"] == "msg"]
        others = [f for f in got if f["op"] != "msg"]
        assert others in ([], [{"op": "kicked", "reason": "slow_consumer"}]), others
        assert [m["seq"] for m in msgs] == list(range(1, len(msgs) + 1))
        assert len(msgs) < kicked_at
        # Reconnect: sync and history show every message.
        again = await clients.connect("tcp")
        await again.login("slowuser", register=False)
        s = await again.ok("sync")
        (conv,) = s["convs"]
        n = len(acked)
        assert conv["conv"] == "d:sender:slowuser"
        assert (conv["last_seq"], conv["unread"]) == (n, n)
        assert conv["last_msg"]["body"] == acked[-1][1]
        seen: list[tuple[int, str]] = []
        while True:
            after = seen[-1][0] if seen else 0
            h = await again.ok("history", conv=conv["conv"], after_seq=after, limit=200)
            seen += [(m["seq"], m["body"]) for m in h["msgs"]]
            if not h["more"]:
                break
        assert seen == acked
        # The new connection gets new messages live.
        r = await sender.ok("send", to="slowuser", cid="after", body="welcome back")
        m = await again.push("msg")
        assert (m["seq"], m["body"]) == (r["seq"], "welcome back") == (n + 1, "welcome back")
        await pair.check("slow consumer")


async def test_pipelined_requests_do_not_kick_a_client_that_reads(
    server: ServerInfo, clients: Clients
) -> None:
    """A client that pipelines many requests in one write, and reads every reply, is no
    slow consumer: all its replies come and it stays connected (default outbound_queue)."""
    with trio.fail_after(20):
        pair = await make_pair(server, clients)
        c = await clients.user("carol")
        n = 4000  # about 50 KB of pings: one read on the server, 4000 replies
        data = b"".join(encode_frame({"op": "ping", "rid": i}) for i in range(1, n + 1))
        got: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.send_raw, data)
            try:
                while len(got) < n:
                    got.append(await c.recv_frame())
            except (Closed, trio.BrokenResourceError):
                pass
        kicks = server.state.stats.kicks
        assert kicks == {}, f"kicked after {len(got)} of {n} pongs: {kicks}"
        assert [f["rid"] for f in got] == list(range(1, n + 1))
        await c.ok("ping")
        await pair.check("pipelined pings")


# ---------------------------------------------------------------- WebSocket

# name -> (client kind, message, error code expected before the close or None, close code)
WS_FATAL: dict[str, tuple[str, str | bytes, str | None, int]] = {
    "text-not-json": ("ws-json", "{not json", "bad_frame", 1002),
    "text-json-array": ("ws-json", '[{"op": "ping"}]', "bad_frame", 1002),
    "text-without-op": ("ws-json", '{"rid": 1}', "bad_frame", 1002),
    "text-op-not-string": ("ws-json", '{"op": 1, "rid": 1}', "bad_frame", 1002),
    "text-two-objects": ("ws-json", '{"op": "ping"}{"op": "ping"}', "bad_frame", 1002),
    "text-nan": ("ws-json", '{"op": "ping", "x": NaN}', "bad_frame", 1002),
    "text-over-max-frame": (
        "ws-json",
        '{"op": "ping", "pad": "' + "x" * MAX_FRAME + '"}',
        "bad_frame",
        1002,
    ),
    "binary-trailing-garbage": (
        "ws",
        msgpack.packb({"op": "ping", "rid": 1}) + b"\xc1",
        "bad_frame",
        1002,
    ),
    "binary-truncated-second-map": (
        "ws",
        msgpack.packb({"op": "ping", "rid": 1}) + msgpack.packb({"op": "ping", "rid": 2})[:-1],
        "bad_frame",
        1002,
    ),
    "binary-not-a-map": ("ws", msgpack.packb([1, 2, 3]), "bad_frame", 1002),
    "binary-map-without-op": ("ws", msgpack.packb({"rid": 1}), "bad_frame", 1002),
    "binary-over-max-message": ("ws", b"\x80" * ((1 << 20) + 1), None, 1009),
    "text-over-max-message": ("ws-json", "x" * ((1 << 20) + 1), None, 1009),
    "text-multibyte-over-max-message": ("ws-json", "你" * ((1 << 20) // 3 + 1), None, 1009),
}


async def ws_send_tolerant(c: TestClient, message: str | bytes) -> None:
    """Send one message; the server may close while it is still on its way."""
    try:
        await c.send_raw(message)
    except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
        pass


@pytest.mark.parametrize("authed", [False, True], ids=["before-auth", "after-auth"])
async def test_ws_bad_messages_close_with_the_documented_code(
    server: ServerInfo, clients: Clients, authed: bool
) -> None:
    with trio.fail_after(45):
        pair = await make_pair(server, clients, ("ws", "ws-json"))
        for i, (name, (kind, message, error, close)) in enumerate(WS_FATAL.items()):
            c = await clients.connect(kind)
            if authed:
                await c.login(f"mallory{i}")
            await ws_send_tolerant(c, message)
            with trio.fail_after(5):
                frames, code = await closed(c)
            assert code == close, (name, code, frames)
            if error is None:
                assert all(f["op"] == "error" for f in frames), (name, frames)
            else:
                assert len(frames) == 1, (name, frames)
                assert_error(frames[0], error)
            if authed:

                def detached(user: str = c.user) -> bool:
                    return server.state.hub.devices(user) == []

                await wait_until(detached, f"{name}: detach")
            await wait_until(lambda: sessions_of(server) == 2, f"{name}: session to end")
        await pair.check("bad WebSocket messages")


async def test_ws_mixed_encodings_close_1002(server: ServerInfo, clients: Clients) -> None:
    """The first message fixes the encoding; a message of the other type is bad_frame."""
    with trio.fail_after(15):
        pair = await make_pair(server, clients, ("ws", "tcp"))
        for kind, other in (("ws", '{"op": "ping", "rid": 5}'), ("ws-json", pack_ping())):
            c = await clients.user(f"mixed-{kind}", kind)
            await c.ok("ping")
            await c.send_raw(other)
            with trio.fail_after(5):
                frames, code = await closed(c)
            assert code == 1002, (kind, frames)
            assert len(frames) == 1, frames
            assert_error(frames[0], "bad_frame")
        await pair.check("mixed encodings")


def pack_ping() -> bytes:
    packed: bytes = msgpack.packb({"op": "ping", "rid": 5})
    return packed


@pytest.mark.parametrize("kind", ["ws", "ws-json"])
async def test_ws_first_frame_not_auth_is_unauthorized_1008(
    server: ServerInfo, clients: Clients, kind: str
) -> None:
    with trio.fail_after(15):
        pair = await make_pair(server, clients, ("ws", "ws-json"))
        for frame in (
            {"op": "send", "rid": 3, "to": "bob", "cid": "x", "body": "sneaky"},
            {"op": "ping", "rid": 3},
            {"op": "no_such_op", "rid": 3},
        ):
            c = await clients.connect(kind)
            await c.send_frame(frame)
            with trio.fail_after(5):
                frames, code = await closed(c)
            assert code == 1008, (frame, code, frames)
            assert len(frames) == 1, (frame, frames)
            assert_error(frames[0], "unauthorized", rid=3)
        await pair.check("unauthenticated WebSocket frames")
        h = await pair.bob.ok("history", conv=CONV, limit=200)
        assert "sneaky" not in [m["body"] for m in h["msgs"]]


@pytest.mark.parametrize("kind", ["ws", "ws-json"])
async def test_ws_session_errors_keep_the_connection(
    server: ServerInfo, clients: Clients, kind: str
) -> None:
    """Over WebSocket too: failed login, unknown op, invalid fields and too_large keep it open."""
    with trio.fail_after(15):
        pair = await make_pair(server, clients, ("tcp", kind))
        c = await clients.connect(kind)
        r = await c.request("login", user="alice", password="wrong-password")
        assert_error(r, "unauthorized", rid=r["rid"])
        await c.ok("login", user="alice", password="password1", device="ws2")
        r = await c.request("no_such_op")
        assert_error(r, "unknown_op", rid=r["rid"])
        r = await c.request("history", conv=CONV, limit=0)
        assert_error(r, "invalid", rid=r["rid"])
        r = await c.request("send", to="bob", cid=7, body="x")
        assert_error(r, "invalid", rid=r["rid"])
        r = await c.request("send", to="bob", cid="big", body="你" * 6000)
        assert_error(r, "too_large", rid=r["rid"])
        h = await c.ok("history", conv=CONV, limit=200)
        assert [(m["seq"], m["body"]) for m in h["msgs"]] == pair.acked
        await pair.check("WebSocket session errors")
