"""The HTTP shim (PROTOCOL §9) against the real server and PostgreSQL, over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from imserver.app import ServerInfo
from imserver.config import Config

from .conftest import Clients, test_config


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
