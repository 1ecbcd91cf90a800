"""The imserver command: config errors, migrate, user add, token (real subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from imserver.app import ServerInfo, serve
from imserver.config import Config, ConfigError, load

from .client import TestClient
from .conftest import test_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMSERVER_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "imserver.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=120,
    )


def test_server_toml_lists_every_default() -> None:
    assert load(ROOT / "server.toml", env={}) == Config()
    text = (ROOT / "server.toml").read_text()
    for section, values in Config().__dict__.items():
        assert f"[{section}]" in text
        for key in values.__dict__:
            assert f"\n{key} = " in text, f"{section}.{key} missing from server.toml"


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[tcp]\nprot = 1\n", {}, "tcp.prot: unknown option"),
        ("[tcpp]\n", {}, "tcpp: unknown section"),
        ("[tcp]\nport = 'x'\n", {}, "tcp.port: expected an integer"),
        ("[tcp]\nport = 70000\n", {}, "tcp.port: must be at most 65535"),
        ("[log]\nlevel = 'loud'\n", {}, "log.level: expected one of"),
        ("[tcp\n", {}, "not valid TOML"),
        ("", {"IMSERVER_TCP_PORT": "abc"}, "IMSERVER_TCP_PORT (tcp.port): expected an integer"),
        ("", {"IMSERVER_NOPE_X": "1"}, "IMSERVER_NOPE_X: unknown section"),
        ("", {"IMSERVER_CHAT_REQUIRE_FRIENDSHIP": "maybe"}, "expected true or false"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, toml: str, env: dict[str, str], needle: str
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(toml)
    r = run_cli("--config", str(cfg), "serve", env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]


def test_missing_config_file(tmp_path: Path) -> None:
    r = run_cli("--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert "no such file" in r.stderr


def test_config_module_rejects_inconsistent_values() -> None:
    with pytest.raises(ConfigError, match="heartbeat_timeout"):
        test_config(session={"heartbeat": 30, "heartbeat_timeout": 20.0})


@pytest.mark.slow
async def test_migrate_user_add_and_token(db_dsn: str, tmp_path: Path) -> None:
    env = {
        "IMSERVER_DSN": db_dsn,
        "IMSERVER_AUTH_ARGON2_TIME_COST": "1",
        "IMSERVER_AUTH_ARGON2_MEMORY_KIB": "64",
        "IMSERVER_LOG_LEVEL": "warning",
    }
    r = await trio.to_thread.run_sync(lambda: run_cli("migrate", env=env, cwd=tmp_path))
    assert r.returncode == 0, r.stderr
    r = await trio.to_thread.run_sync(
        lambda: run_cli(
            "user", "add", "alice", "--password-stdin", env=env, stdin="s3cret-pass\n", cwd=tmp_path
        )
    )
    assert r.returncode == 0, r.stderr
    r = await trio.to_thread.run_sync(
        lambda: run_cli(
            "user", "add", "alice", "--password-stdin", env=env, stdin="s3cret-pass\n", cwd=tmp_path
        )
    )
    assert r.returncode == 1
    assert "already exists" in r.stderr
    r = await trio.to_thread.run_sync(
        lambda: run_cli(
            "user", "add", "bob", "--password-stdin", env=env, stdin="short\n", cwd=tmp_path
        )
    )
    assert r.returncode == 2
    r = await trio.to_thread.run_sync(lambda: run_cli("token", "nobody", env=env, cwd=tmp_path))
    assert r.returncode == 1
    r = await trio.to_thread.run_sync(
        lambda: run_cli("token", "alice", "--device", "cli", env=env, cwd=tmp_path)
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert len(token) >= 40
    assert token not in r.stderr
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, test_config(), db_dsn)
        try:
            c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
            reply = await c.ok("auth", token=token, device="cli")
            assert reply["user"] == "alice"
            await c.aclose()
            c = await TestClient.tcp(info.tcp_port)  # type: ignore[arg-type]
            await c.ok("login", user="alice", password="s3cret-pass")
            await c.aclose()
        finally:
            info.shutdown()


def test_connection_cap_fits_the_open_file_limit() -> None:
    import resource

    from imserver.app import FD_RESERVE_BASE, connection_cap

    cfg = test_config()
    reserve = FD_RESERVE_BASE + cfg.database.pool_size + cfg.http.max_requests
    assert connection_cap(cfg, (20_000, 20_000)) == 20_000 - reserve
    assert connection_cap(cfg, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)) == 100_000
    small = test_config(limits={"max_connections": 50})
    assert connection_cap(small, (20_000, 20_000)) == 50
    no_http = test_config(http={"enabled": False})
    assert connection_cap(no_http, (1_000, 1_000)) == 1_000 - FD_RESERVE_BASE - 8
    assert connection_cap(cfg, (100, 100)) == 1  # never zero


def test_serve_tunes_the_garbage_collector() -> None:
    """``imserver serve`` freezes what exists at start and raises the young threshold."""
    import gc

    from imserver import cli

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        cli._tune_gc()
        assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
