"""The HTTP shim (PROTOCOL §9) against the real server and PostgreSQL, over real sockets."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from imserver.app import ServerInfo
from imserver.config import Config
from protocol.codec import encode_frame

from .conftest import Clients, befriend, running_server, test_config


@pytest.fixture
async def http(server: ServerInfo) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.http_port}", timeout=10
    ) as client:
        yield client


def err(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert the JSON error shape of PROTOCOL §9 and return the error object."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


async def register(http: httpx.AsyncClient, user: str, device: str = "web") -> str:
    r = await http.post(
        "/api/v1/register", json={"user": user, "password": "password1", "device": device}
    )
    assert r.status_code == 200, r.text
    assert r.json()["user"] == user
    return r.json()["token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_register_login_and_token_auth(http: httpx.AsyncClient, clients: Clients) -> None:
    token = await register(http, "alice")
    r = await http.post("/api/v1/login", json={"user": "alice", "password": "password1"})
    assert r.status_code == 200
    token2 = r.json()["token"]
    assert token2 != token
    # The HTTP token works on the framed protocol too.
    c = await clients.connect()
    reply = await c.ok("auth", token=token2, device="phone")
    assert reply["user"] == "alice"
    bad = {"user": "alice", "password": "wrong-pass"}
    err(await http.post("/api/v1/login", json=bad), 401, "unauthorized")
    again = {"user": "alice", "password": "password1"}
    err(await http.post("/api/v1/register", json=again), 409, "conflict")
    r = await http.get("/api/v1/conversations", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json() == {"convs": []}


async def test_health_and_info(http: httpx.AsyncClient, server: ServerInfo) -> None:
    r = await http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "storage": "up"}
    info = (await http.get("/api/v1/info")).json()
    assert info["ws_port"] == server.ws_port and info["tcp_port"] == server.tcp_port
    assert info["ws_path"] == "/ws"
    spec = (await http.get("/openapi.json")).json()
    assert "/api/v1/poll" in spec["paths"]


# -- WeChat callbacks (PROTOCOL §10) --------------------------------------------

APPID = "wx_app1"
SECRET = "callback-secret-0123456789"
ADMIN = "admin-token-0123456789abcdef"
ME = "wxid_me"


@pytest.fixture
def config() -> Config:
    return test_config(
        wechat={"accounts": [{"appid": APPID, "token": SECRET, "owners": ["owner"]}]},
        http={"port": 0, "admin_token": ADMIN, "max_pollers_per_user": 2},
    )


def add_msg(
    new_msg_id: int,
    *,
    from_user: str = "wxid_alice",
    to_user: str = ME,
    content: str = "hello",
    msg_type: int = 1,
    create_time: int = 1_700_000_000,
    lower: bool = False,
) -> dict[str, Any]:
    data = {
        "MsgId": 1040356095,
        "NewMsgId": new_msg_id,
        "MsgType": msg_type,
        "FromUserName": {"string": from_user},
        "ToUserName": {"string": to_user},
        "Content": {"string": content},
        "CreateTime": create_time,
        "PushContent": "",
        "MsgSource": "<msgsource></msgsource>",
    }
    if lower:
        return {"type_name": "AddMsg", "appid": APPID, "wxid": ME, "data": data}
    return {"TypeName": "AddMsg", "Appid": APPID, "Wxid": ME, "Data": data}


async def callback(http: httpx.AsyncClient, payload: Any, token: str = SECRET) -> httpx.Response:
    return await http.post("/wechat/callback", params={"token": token}, json=payload)


async def test_wechat_messages_reach_owner_and_only_owner(
    http: httpx.AsyncClient, clients: Clients
) -> None:
    owner = await clients.user("owner", "ws")
    stranger_token = await register(http, "stranger")
    owner_token = owner.token
    big = 2**63 - 25  # beyond 2**53: must stay exact
    cases = [
        # (payload, conv, from, kind, body)
        (add_msg(big), f"wx:{APPID}:wxid_alice", "wx:wxid_alice", "text", "hello"),
        (
            add_msg(
                1001,
                from_user="123@chatroom",
                content="wxid_bob:\n大家好，你好吗",
                lower=True,
            ),
            f"wx:{APPID}:123@chatroom",
            "wx:wxid_bob",
            "text",
            "大家好，你好吗",
        ),
        (
            add_msg(1002, msg_type=3, content="<msg><img/></msg>"),
            f"wx:{APPID}:wxid_alice",
            "wx:wxid_alice",
            "image",
            "<msg><img/></msg>",
        ),
        (
            add_msg(1003, from_user=ME, to_user="wxid_carol", msg_type=49, content="<appmsg/>"),
            f"wx:{APPID}:wxid_carol",
            f"wx:{ME}",
            "app",
            "<appmsg/>",
        ),
    ]
    for i, (payload, conv, sender, kind, body) in enumerate(cases):
        payload["Data" if "Data" in payload else "data"]["CreateTime"] = 1_700_000_000 + i
        r = await callback(http, payload)
        assert r.status_code == 200 and r.json() == {"status": "success"}, r.text
        push = await owner.push("msg")
        got = (push["conv"], push["from"], push["kind"], push["body"])
        assert got == (conv, sender, kind, body)
        assert push["ts"] == (1_700_000_000 + i) * 1000
        assert push["meta"]["msg_type"] == payload.get("Data", payload.get("data"))["MsgType"]
    # The duplicate: stored once, delivered once, answered 200.
    r = await callback(http, add_msg(big))
    assert r.status_code == 200
    # Exact 64-bit id, as a string; history shows one copy.
    hist = await owner.ok("history", conv=f"wx:{APPID}:wxid_alice")
    assert [m["meta"]["new_msg_id"] for m in hist["msgs"]] == [str(big), "1002"]
    sync = await owner.ok("sync")
    kinds = {c["conv"]: (c["kind"], c["title"], c["unread"]) for c in sync["convs"]}
    assert kinds[f"wx:{APPID}:wxid_alice"] == ("wechat", "wxid_alice", 2)
    assert kinds[f"wx:{APPID}:123@chatroom"] == ("wechat", "123@chatroom", 1)
    # Nothing more was pushed for the duplicate.
    await owner.ok("ping")
    assert not [p for p in owner.pushes if p["op"] == "msg"]
    # The owner reads it over HTTP too.
    r = await http.get(
        f"/api/v1/conversations/wx:{APPID}:wxid_alice/messages", headers=bearer(owner_token)
    )
    assert [m["body"] for m in r.json()["msgs"]] == ["hello", "<msg><img/></msg>"]
    # A non-owner sees nothing of them through any route.
    h = bearer(stranger_token)
    assert (await http.get("/api/v1/conversations", headers=h)).json() == {"convs": []}
    err(
        await http.get(f"/api/v1/conversations/wx:{APPID}:wxid_alice/messages", headers=h),
        403,
        "forbidden",
    )
    r = await http.get("/api/v1/search", params={"q": "你好"}, headers=h)
    assert r.status_code == 200 and r.json()["msgs"] == []
    r = await http.get("/api/v1/search", params={"q": "你好"}, headers=bearer(owner_token))
    assert [m["body"] for m in r.json()["msgs"]] == ["大家好，你好吗"]
    cur = (await http.get("/api/v1/poll", headers=h)).json()["cursor"]
    stranger = await clients.connect()
    await stranger.ok("auth", token=stranger_token)
    err_frame = await stranger.request("history", conv=f"wx:{APPID}:wxid_alice")
    assert err_frame["code"] == "forbidden"
    assert (await stranger.request("read", conv=f"wx:{APPID}:wxid_alice", seq=1))["op"] == "error"
    r = await http.get("/api/v1/poll", params={"cursor": cur, "timeout": 0}, headers=h)
    assert r.json()["messages"] == []


async def test_wechat_rejects_bad_secret_and_bad_bodies(
    http: httpx.AsyncClient, clients: Clients
) -> None:
    owner = await clients.user("owner")
    err(await callback(http, add_msg(5), token="wrong-secret-0123456789"), 401, "unauthorized")
    err(await http.post("/wechat/callback", json=add_msg(5)), 401, "unauthorized")
    other = add_msg(6)
    other["Appid"] = "wx_unknown"
    err(await callback(http, other), 401, "unauthorized")
    r = await http.post(
        "/wechat/callback",
        params={"token": SECRET},
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    e = err(r, 400, "invalid")
    assert "JSON" in e["message"] or "json" in e["message"]
    missing = add_msg(7)
    del missing["Data"]["NewMsgId"]
    assert "NewMsgId" in err(await callback(http, missing), 400, "invalid")["message"]
    # Handshake and other event types: 200, nothing stored.
    r = await callback(http, {"testMsg": "回调地址链接成功！", "token": "x"})
    assert r.status_code == 200
    for t in ("ModContacts", "DelContacts", "Offline"):
        r = await callback(http, {"TypeName": t, "Appid": APPID, "Data": {}})
        assert r.status_code == 200, r.text
    # Signed instead of the query token.
    import hashlib
    import hmac as hmac_mod
    import json as json_mod

    body = json_mod.dumps(add_msg(8, content="signed")).encode()
    sig = hmac_mod.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    r = await http.post("/wechat/callback", content=body, headers={"X-Signature": f"sha256={sig}"})
    assert r.status_code == 200, r.text
    r = await http.post(
        "/wechat/callback", content=body, headers={"X-Signature": "sha256=" + "0" * 64}
    )
    err(r, 401, "unauthorized")
    # Only the signed message was stored.
    sync = await owner.ok("sync")
    assert [c["last_msg"]["body"] for c in sync["convs"]] == ["signed"]
    # Big callbacks (inline thumbnails) up to http.max_body_bytes are accepted.
    thumb = add_msg(9, msg_type=3, content="<img/>")
    thumb["Data"]["ImgBuf"] = {"buffer": "A" * 3_000_000, "iLen": 3_000_000}
    assert (await callback(http, thumb)).status_code == 200
    too_big = add_msg(10)
    too_big["Data"]["ImgBuf"] = {"buffer": "A" * 5_000_000}
    port = int(str(http.base_url).rsplit(":", 1)[1].rstrip("/"))
    status, body = await raw_post(port, f"/wechat/callback?token={SECRET}", too_big)
    assert status == 413 and body["error"]["code"] == "too_large"
    # Without Content-Length (chunked), the limit holds while reading.
    status, body = await raw_post(port, f"/wechat/callback?token={SECRET}", too_big, chunked=True)
    assert status == 413 and body["error"]["code"] == "too_large"
    # Other routes take at most http.max_json_body_bytes.
    status, body = await raw_post(port, "/api/v1/login", {"user": "x" * 70_000, "password": "p"})
    assert status == 413 and body["error"]["code"] == "too_large"
    sync = await owner.ok("sync")
    assert sum(c["last_seq"] for c in sync["convs"]) == 2  # "signed" and the thumbnail


async def raw_post(
    port: int, target: str, payload: Any, *, chunked: bool = False
) -> tuple[int, dict[str, Any]]:
    """POST with a plain socket (the server may answer before the body is sent)."""
    import json as json_mod

    data = json_mod.dumps(payload).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
        data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        head += f"Content-Length: {len(data)}\r\n\r\n"
    response = b""
    async with stream:
        try:
            await stream.send_all(head.encode() + data)
        except trio.BrokenResourceError:
            pass  # answered and closed before the whole body went out
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                response += chunk
                if b"\r\n\r\n" in response:
                    header, _, rest = response.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in header.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(rest) >= length[0]:
                        break
    header, _, rest = response.partition(b"\r\n\r\n")
    return int(header.split()[1]), json_mod.loads(rest)


# -- long-poll -------------------------------------------------------------------


async def test_long_poll_wakes_on_commit_times_out_and_survives_disconnect(
    http: httpx.AsyncClient, clients: Clients, server: ServerInfo
) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    await befriend(alice, bob)
    h = bearer(bob.token)
    # No cursor: at once, no messages, the current cursor.
    first = (await http.get("/api/v1/poll", headers=h)).json()
    assert first["messages"] == [] and isinstance(first["cursor"], str)
    # A short timeout with nothing new: empty, same cursor.
    start = trio.current_time()
    r = await http.get(
        "/api/v1/poll", params={"cursor": first["cursor"], "timeout": 0.3}, headers=h
    )
    assert r.json() == {"messages": [], "cursor": first["cursor"]}
    assert trio.current_time() - start >= 0.29
    # A waiting poll returns within 100 ms of the commit.
    got: dict[str, Any] = {}

    async def poll() -> None:
        params = {"cursor": first["cursor"], "timeout": 10}
        resp = await http.get("/api/v1/poll", params=params, headers=h)
        got["at"] = trio.current_time()
        got["body"] = resp.json()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        await wait_for_pollers(server, 1)
        reply = await alice.ok("send", to="bob", cid="c1", body="wake up")
        acked = trio.current_time()
    assert got["at"] - acked < 0.1, got["at"] - acked
    msgs = got["body"]["messages"]
    assert [(m["body"], m["seq"], m["mid"]) for m in msgs] == [("wake up", 1, reply["mid"])]
    cursor = got["body"]["cursor"]
    assert cursor != first["cursor"]
    # Already there: at once. The sender's own messages come too.
    await bob.ok("send", to="alice", cid="c2", body="back")
    r = await http.get("/api/v1/poll", params={"cursor": cursor, "timeout": 5}, headers=h)
    assert [m["body"] for m in r.json()["messages"]] == ["back"]
    # A client that goes away mid-wait: the poll ends and frees its slot.
    port = server.http_port
    for _ in range(3):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        target = f"/api/v1/poll?cursor={r.json()['cursor']}&timeout=30"
        auth = f"Authorization: Bearer {bob.token}"
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: t\r\n{auth}\r\n\r\n".encode())
        await wait_for_pollers(server, 1)
        await stream.aclose()
        await wait_for_pollers(server, 0)
    # The server still serves bob's polls (max_pollers_per_user is 2 here).
    r = await http.get("/api/v1/poll", params={"cursor": cursor, "timeout": 0}, headers=h)
    assert r.status_code == 200


async def wait_for_pollers(server: ServerInfo, n: int) -> None:
    """Poll (no event to wait on: the count lives in the server under test)."""
    with trio.fail_after(5):
        while len(server.state.hub.pollers) != n:  # noqa: ASYNC110
            await trio.sleep(0.005)


async def test_long_poll_limits(http: httpx.AsyncClient, server: ServerInfo) -> None:
    token = await register(http, "carol")
    h = bearer(token)
    cursor = (await http.get("/api/v1/poll", headers=h)).json()["cursor"]
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(
                functools.partial(
                    http.get, "/api/v1/poll", params={"cursor": cursor, "timeout": 2}, headers=h
                )
            )
        await wait_for_pollers(server, 2)
        r = await http.get("/api/v1/poll", params={"cursor": cursor, "timeout": 2}, headers=h)
        err(r, 429, "rate_limited")
        assert int(r.headers["Retry-After"]) >= 1
        nursery.cancel_scope.cancel()
    for params in (
        {"cursor": cursor, "timeout": 61},
        {"cursor": cursor, "timeout": -1},
        {"cursor": cursor, "timeout": "soon"},
        {"cursor": "not-a-cursor"},
        {"cursor": "bTE6LTE"},  # "m1:-1"
    ):
        err(await http.get("/api/v1/poll", params=params, headers=h), 400, "invalid")
    err(await http.get("/api/v1/poll"), 401, "unauthorized")


# -- bad input on every route, admin notices, metrics -------------------------


async def test_bad_input_on_every_route(http: httpx.AsyncClient, clients: Clients) -> None:
    token = await register(http, "dave")
    h = bearer(token)
    # Bodies that are not JSON, or of the wrong shape.
    for route in ("/api/v1/register", "/api/v1/login"):
        r = await http.post(route, content=b"{", headers={"content-type": "application/json"})
        err(r, 400, "invalid")
        err(await http.post(route, json=[1, 2]), 400, "invalid")
        err(await http.post(route, json={"user": "dave"}), 400, "invalid")
        err(await http.post(route, json={"user": 5, "password": "password1"}), 400, "invalid")
        err(await http.post(route, json={"user": "a b", "password": "password1"}), 400, "invalid")
    short = {"user": "erin", "password": "short"}
    assert (
        "password"
        in err(await http.post("/api/v1/register", json=short), 400, "invalid")["message"]
    )
    # Authentication.
    for route in ("/api/v1/conversations", "/api/v1/search?q=x", "/api/v1/poll"):
        err(await http.get(route), 401, "unauthorized")
        err(await http.get(route, headers=bearer("nope")), 401, "unauthorized")
        err(await http.get(route, headers={"Authorization": "Basic eDp5"}), 401, "unauthorized")
    # History.
    base = "/api/v1/conversations"
    err(await http.get(f"{base}/d:dave:zed/messages?limit=0", headers=h), 400, "invalid")
    err(await http.get(f"{base}/d:dave:zed/messages?limit=201", headers=h), 400, "invalid")
    err(await http.get(f"{base}/d:dave:zed/messages?after_seq=x", headers=h), 400, "invalid")
    err(await http.get(f"{base}/nonsense/messages", headers=h), 400, "invalid")
    err(await http.get(f"{base}/d:alice:bob/messages", headers=h), 403, "forbidden")
    err(await http.get(f"{base}/g:999/messages", headers=h), 404, "not_found")
    r = await http.get(f"{base}/d:dave:zed/messages", headers=h)
    assert r.status_code == 200 and r.json() == {"msgs": [], "more": False}
    # Search.
    err(await http.get("/api/v1/search", headers=h), 400, "invalid")
    err(await http.get("/api/v1/search?q=", headers=h), 400, "invalid")
    err(await http.get("/api/v1/search", params={"q": "x" * 257}, headers=h), 400, "invalid")
    err(await http.get("/api/v1/search?q=x&limit=0", headers=h), 400, "invalid")
    err(await http.get("/api/v1/search?q=x&limit=101", headers=h), 400, "invalid")
    err(await http.get("/api/v1/search?q=x&before_mid=0", headers=h), 400, "invalid")
    # Unknown routes and methods.
    err(await http.get("/api/v1/nothing-here"), 404, "not_found")
    err(await http.delete("/api/v1/conversations", headers=h), 405, "invalid")
    # Admin: disabled without the token, 401 with a wrong one, 400 for bad bodies.
    notice = {"kind": "system", "title": "t", "body": "b"}
    err(await http.post("/api/v1/admin/notices", json=notice), 401, "unauthorized")
    err(
        await http.post("/api/v1/admin/notices", json=notice, headers=bearer("x" * 30)),
        401,
        "unauthorized",
    )
    admin = bearer(ADMIN)
    err(
        await http.post("/api/v1/admin/notices", json={"title": "t"}, headers=admin), 400, "invalid"
    )
    bad_users = {**notice, "users": ["nobody-here"]}
    err(await http.post("/api/v1/admin/notices", json=bad_users, headers=admin), 404, "not_found")
    big = {**notice, "body": "x" * 20_000}
    err(await http.post("/api/v1/admin/notices", json=big, headers=admin), 413, "too_large")
    for field in ("kind", "title", "body"):
        nul = {**notice, field: "a\x00b"}
        err(await http.post("/api/v1/admin/notices", json=nul, headers=admin), 400, "invalid")
    nul_user = {**notice, "users": ["al\x00ice"]}
    err(await http.post("/api/v1/admin/notices", json=nul_user, headers=admin), 400, "invalid")
    # A NUL in a path segment is refused too, not sent to PostgreSQL.
    err(await http.get("/api/v1/conversations/d:a%00:b/messages", headers=h), 400, "invalid")


async def test_admin_notice_is_pushed_and_listed(http: httpx.AsyncClient, clients: Clients) -> None:
    alice = await clients.user("alice", "ws-json")
    r = await http.post(
        "/api/v1/admin/notices",
        json={"kind": "maintenance", "title": "维护", "body": "tonight", "users": ["alice"]},
        headers=bearer(ADMIN),
    )
    assert r.status_code == 200, r.text
    notice = r.json()
    push = await alice.push("notice")
    assert push["id"] == notice["id"] and push["title"] == "维护"
    listed = await alice.ok("notices")
    assert [n["id"] for n in listed["notices"]] == [notice["id"]]


async def test_admin_api_disabled_without_token(db_dsn: str) -> None:
    async with (
        running_server(test_config(), db_dsn) as info,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{info.http_port}") as http,
    ):
        r = await http.post("/api/v1/admin/notices", json={"body": "b"}, headers=bearer("x" * 30))
        err(r, 403, "forbidden")


async def test_metrics_parse_and_move_with_traffic(
    http: httpx.AsyncClient, clients: Clients
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = await http.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    before = await scrape()
    alice = await clients.user("alice")
    bob = await clients.user("bob", "ws")
    await befriend(alice, bob)
    for i in range(3):
        await alice.ok("send", to="bob", cid=f"m{i}", body="hi")
    await alice.request("send", to="nobody-here", cid="x", body="hi")  # forbidden: not friends
    after = await scrape()
    assert (
        after[("imserver_messages_accepted_total", ())]
        - before.get(("imserver_messages_accepted_total", ()), 0)
        == 3
    )
    assert after[("imserver_messages_delivered_total", ())] >= 3
    assert after[("imserver_connections", (("transport", "tcp"),))] == 1
    assert after[("imserver_connections", (("transport", "ws"),))] == 1
    assert after[("imserver_sessions", ())] == 2
    assert after[("imserver_batch_rows_count", ())] >= 1
    assert after[("imserver_commit_seconds_bucket", (("le", "+Inf"),))] >= 1
    assert after[("imserver_errors_total", (("code", "forbidden"),))] >= 1
    assert after[("imserver_storage_up", ())] == 1
    assert ("imserver_writer_queue", ()) in after
    assert ("imserver_outbound_queue_depth", ()) in after


async def test_requests_in_progress_and_waiting_polls_are_capped(db_dsn: str) -> None:
    cfg = test_config(
        http={
            "port": 0,
            "max_requests": 3,
            "max_pollers": 2,
            "max_pollers_per_user": 4,
            "body_timeout_s": 1.0,
        }
    )
    async with (
        running_server(cfg, db_dsn) as info,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{info.http_port}") as http,
    ):
        h = bearer(await register(http, "frank"))
        cursor = (await http.get("/api/v1/poll", headers=h)).json()["cursor"]
        params = {"cursor": cursor, "timeout": 5}
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(
                    functools.partial(http.get, "/api/v1/poll", params=params, headers=h)
                )
            await wait_for_pollers(info, 2)
            # A third poll that would wait: the pollers' cap (503), not a slot.
            err(await http.get("/api/v1/poll", params=params, headers=h), 503, "unavailable")
            # A body that never comes holds the third request slot...
            slow = await trio.open_tcp_stream("127.0.0.1", info.http_port)
            await slow.send_all(
                b"POST /api/v1/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                b"\r\nContent-Length: 100\r\n\r\n{"
            )
            with trio.fail_after(5):
                while (await http.get("/api/v1/conversations", headers=h)).status_code != 503:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            # ... but /healthz is always answered.
            assert (await http.get("/healthz")).status_code == 200
            # After body_timeout_s the slow body is refused with 408.
            with trio.fail_after(5):
                answer = await slow.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            await slow.aclose()
            nursery.cancel_scope.cancel()
        await wait_for_pollers(info, 0)
        assert (await http.get("/api/v1/conversations", headers=h)).status_code == 200


async def test_wechat_owner_changes_replays_and_limits(db_dsn: str) -> None:
    """Owners come from the config only; replays are keyed by the first sender;
    pushes fit the frame limits; CreateTime 0 is kept; odd peer ids work."""
    account = {"appid": APPID, "token": SECRET, "owners": ["owner"]}
    cfg = test_config(wechat={"accounts": [account]})
    async with running_server(cfg, db_dsn) as info, trio.open_nursery() as nursery:
        clients = Clients(info, nursery)
        owner = await clients.user("owner")
        await clients.user("newowner")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{info.http_port}") as http:
            r = await callback(http, add_msg(556, from_user="wxid_x", content="one"))
            assert r.status_code == 200
            # The same NewMsgId naming another sender is still the same message.
            r = await callback(http, add_msg(556, from_user="wxid_y", content="two"))
            assert r.status_code == 200
            big = add_msg(557, content="x" * 100_000, create_time=0)
            big["Data"]["PushContent"] = "p" * 200_000
            assert (await callback(http, big)).status_code == 200
            odd = add_msg(558, from_user="wxid:a/b", content="odd")
            assert (await callback(http, odd)).status_code == 200
            owner_h = bearer(owner.token)
            msgs = [await owner.push("msg") for _ in range(3)]
            assert [m["body"][:3] for m in msgs] == ["one", "xxx", "odd"]
            cut = msgs[1]
            assert len(encode_frame(cut)) <= cfg.limits.max_frame_bytes
            assert cut["meta"]["truncated"] is True and cut["ts"] == 0
            conv = f"wx:{APPID}:wxid:a/b"
            r = await http.get(f"/api/v1/conversations/{conv}/messages", headers=owner_h)
            assert [m["body"] for m in r.json()["msgs"]] == ["odd"]
            titles = {c["conv"]: c["title"] for c in (await owner.ok("sync"))["convs"]}
            assert titles[conv] == "wxid:a/b"
            # Refused before the body is read: a wrong secret with a big body.
            stream = await trio.open_tcp_stream("127.0.0.1", info.http_port)
            await stream.send_all(
                b"POST /wechat/callback?token=wrong HTTP/1.1\r\nHost: t\r\n"
                b"Content-Length: 4000000\r\n\r\n"
            )
            with trio.fail_after(5):
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 401")
            await stream.aclose()
        for c in clients.opened:
            await c.aclose()
        nursery.cancel_scope.cancel()
    # Restart with another owner: the old one loses the account, the new one gets it.
    cfg = test_config(wechat={"accounts": [{**account, "owners": ["newowner"]}]})
    async with (
        running_server(cfg, db_dsn) as info,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{info.http_port}") as http,
    ):

        async def token_of(user: str) -> dict[str, str]:
            body = {"user": user, "password": "password1"}
            return bearer((await http.post("/api/v1/login", json=body)).json()["token"])

        old, new = await token_of("owner"), await token_of("newowner")
        r = await callback(http, add_msg(559, content="after the change"))
        assert r.status_code == 200
        for h, (n_convs, n_found, n_polled) in ((old, (0, 0, 0)), (new, (3, 2, 4))):
            convs = (await http.get("/api/v1/conversations", headers=h)).json()["convs"]
            assert len(convs) == n_convs, convs
            found = (await http.get("/api/v1/search", params={"q": "o"}, headers=h)).json()
            assert len(found["msgs"]) == n_found, found  # "one", "odd"
            params = {"cursor": "bTE6MA", "timeout": 0}
            r = await http.get("/api/v1/poll", params=params, headers=h)
            assert len(r.json()["messages"]) == n_polled, r.json()
