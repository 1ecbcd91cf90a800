"""A property-based fuzz run of the HTTP shim from its own OpenAPI document.

schemathesis turns ``/openapi.json`` into request strategies (valid and
invalid: wrong types, out-of-range values, odd strings) for every route; the
real server, on real PostgreSQL, must answer each with a status below 500
and, for every 4xx, the JSON error body of PROTOCOL §9.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from imserver.app import ServerInfo
from imserver.config import Config

from .conftest import Clients, befriend, test_config

EXAMPLES_PER_OPERATION = 40


@pytest.fixture
def config() -> Config:
    return test_config(
        http={
            "port": 0,
            "poll_timeout_s": 0.05,
            "poll_max_timeout_s": 0.1,
            "admin_token": "a" * 20,
        },
        rate={"requests_per_s": 1e6, "requests_burst": 1_000_000},
        auth={
            "argon2_time_cost": 1,
            "argon2_memory_kib": 64,
            "min_password_len": 8,
            "login_per_user_per_min": 100_000,
            "login_per_addr_per_min": 100_000,
        },
        wechat={"accounts": [{"appid": "wx_a", "token": "s" * 20, "owners": ["alice"]}]},
    )


@pytest.mark.slow
async def test_openapi_fuzz_finds_no_server_error(server: ServerInfo, clients: Clients) -> None:
    alice = await clients.user("alice")
    bob = await clients.user("bob")
    await befriend(alice, bob)
    await alice.ok("send", to="bob", cid="c1", body="你好 hello")
    base = f"http://127.0.0.1:{server.http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        spec = (await http.get("/openapi.json")).json()
    headers = {"Authorization": f"Bearer {alice.token}"}

    def run() -> list[str]:
        problems: list[str] = []
        schema = schemathesis.openapi.from_dict(spec)
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    deadline=None,
                    database=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )
                def check(case: Any) -> None:
                    response = case.call(base_url=base, headers=headers, timeout=10)
                    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
                    if response.status_code >= 500:
                        problems.append(f"{where}: {response.text[:200]}")
                    elif response.status_code >= 400:
                        body = response.json()
                        if set(body) != {"error"} or not isinstance(body["error"]["code"], str):
                            problems.append(f"{where}: not the JSON error body: {body}")

                try:
                    check()
                except Unsatisfiable:
                    # No invalid input exists (a route without parameters).
                    assert mode is GenerationMode.NEGATIVE, operation
                else:
                    runs.append(f"{operation.label} {mode.value}")
        return problems

    runs: list[str] = []
    problems = await trio.to_thread.run_sync(run)
    assert problems == []
    assert len(runs) >= 12, runs  # every route, valid and invalid input
    # The server still serves after the fuzz run.
    assert (await alice.ok("sync"))["convs"]
