"""The HTTP shim (PROTOCOL §9) against the real server and PostgreSQL, over real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imserver.app import ServerInfo

from .conftest import Clients


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
