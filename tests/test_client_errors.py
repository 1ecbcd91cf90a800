"""Error replies become typed exceptions; timeouts and lost connections too."""

from __future__ import annotations

import pytest
import trio

from clients import (
    Client,
    Conflict,
    ConnectionLost,
    Forbidden,
    Invalid,
    NotFound,
    RateLimited,
    RequestError,
    RequestTimeout,
    TooLarge,
    Unauthorized,
    UnknownOp,
)
from imserver.app import ServerInfo
from imserver.config import Config
from protocol.errors import ErrorCode

from .client_helpers import PASSWORD, Proxy, befriend, open_users
from .conftest import test_config


async def test_error_codes_map_to_exceptions(server: ServerInfo) -> None:
    with trio.fail_after(30):
        async with open_users(server, ("ws", "json")) as users:
            bob = await users.open("bob")
            # A failed login leaves the connection open for another try.
            alice = users.client()
            await alice.start(users.nursery)
            users.opened.append(alice)
            await alice.register("alice", PASSWORD)
            await alice.aclose()
            alice = users.client()
            await alice.start(users.nursery)
            users.opened.append(alice)
            with pytest.raises(Unauthorized) as bad:
                await alice.login("alice", "wrong-password")
            assert bad.value.code is ErrorCode.UNAUTHORIZED
            assert bad.value.op == "login"
            await alice.login("alice", PASSWORD)
            assert alice.user == "alice"
            assert alice.token

            with pytest.raises(Forbidden) as e:
                await alice.send("bob", "not friends yet")
            assert e.value.code == "forbidden"
            assert e.value.message
            assert e.value.op == "send"
            assert "forbidden" in str(e.value)
            assert alice.unacknowledged == []  # refused sends are not retried
            with pytest.raises(Invalid):
                await alice.history("d:alice:bob", limit=500)
            with pytest.raises(NotFound):
                await alice.group_info("999999")
            with pytest.raises(UnknownOp):
                await alice.request("no_such_op")
            with pytest.raises(Invalid):
                await alice.send("alice", "to myself")
            await befriend(alice, bob)
            with pytest.raises(Conflict):
                await alice.friend_request("bob")
            with pytest.raises(TooLarge):
                await alice.send("bob", "x" * 20000)
            with pytest.raises(Conflict):
                await alice.auth(alice.token or "")  # already authenticated
            # All of them are RequestErrors, and the client still works.
            assert issubclass(Conflict, RequestError)
            assert (await alice.send("bob", "still fine")).seq == 1


@pytest.mark.parametrize("config", [test_config(rate={"send_per_s": 4.0, "send_burst": 1})])
async def test_rate_limited_carries_retry_after(server: ServerInfo, config: Config) -> None:
    with trio.fail_after(30):
        async with open_users(server, ("tcp", "msgpack")) as users:
            alice = await users.open("alice", retry_sends=False)
            bob = await users.open("bob")
            await befriend(alice, bob)
            await alice.send("bob", "1")
            with pytest.raises(RateLimited) as e:
                await alice.send("bob", "2")
            assert e.value.code is ErrorCode.RATE_LIMITED
            assert e.value.retry_after is not None
            assert 0 < e.value.retry_after <= 1
            # With retry_sends (the default) the client waits and succeeds.
            patient = await users.open("alice", register=False, device="patient")
            start = trio.current_time()
            results = [await patient.send("bob", str(i)) for i in range(3)]
            assert [r.seq for r in results] == [2, 3, 4]
            assert trio.current_time() - start >= 0.4  # at least two refills of 0.25 s


async def test_request_timeout_and_late_reply(server: ServerInfo) -> None:
    """A reply that does not come in time raises RequestTimeout; the late reply
    is ignored and the client goes on working."""
    assert server.tcp_port is not None
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            proxy = Proxy(server.tcp_port)
            await nursery.start(proxy.run)
            async with open_users(server, ("tcp", "msgpack")) as users:
                alice = await users.open("alice", port=proxy.port, heartbeat=3600)
                await users.open("bob")
                proxy.freeze()
                start = trio.current_time()
                with pytest.raises(RequestTimeout) as e:
                    await alice.friends(timeout=0.5)
                assert e.value.op == "friends"
                assert 0.5 <= trio.current_time() - start < 3
                with pytest.raises(RequestTimeout):
                    await alice.send("bob", "lost?", cid="c-timeout", timeout=0.3)
                # An abandoned send is not resent behind the application's back.
                assert alice.unacknowledged == []
            nursery.cancel_scope.cancel()


async def test_websocket_to_the_tcp_port_fails_cleanly(server: ServerInfo) -> None:
    """A misdirected client gets ConnectionLost; nothing crashes its nursery."""
    assert server.tcp_port is not None
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            c = Client("127.0.0.1", server.tcp_port, transport="ws", reconnect_delays=(0.2,))
            await c.start(nursery)
            with pytest.raises(ConnectionLost):
                await c.login("alice", PASSWORD)
            await c.aclose()
            with pytest.raises(ValueError, match="MessagePack only"):
                Client("127.0.0.1", 1, transport="tcp", encoding="json")
