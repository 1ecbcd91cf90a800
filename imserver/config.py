"""Configuration: ``server.toml`` loading, validation and environment overrides.

Every option has a default (the values PROTOCOL.md names), a type and a range.
Unknown keys are errors, not silently ignored (STYLE anti-pattern 5): a typo in
``server.toml`` or an ``IMSERVER_*`` variable is reported as one line naming the
key, and the command exits with status 2.

Environment overrides: ``IMSERVER_DSN`` sets ``database.dsn``; any other option
is ``IMSERVER_<SECTION>_<KEY>`` in upper case (``IMSERVER_TCP_PORT=7800``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _field(
    default: Any, lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = ()
) -> Any:
    return dataclasses.field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices})


@dataclasses.dataclass
class ServerSection:
    data_dir: str = _field("data")
    node_id: int = _field(0, 0, 1023)
    shutdown_grace: float = _field(5.0, 0.0, 300.0)


@dataclasses.dataclass
class TcpSection:
    enabled: bool = _field(True)
    host: str = _field("127.0.0.1")
    port: int = _field(7700, 0, 65535)


@dataclasses.dataclass
class WebSocketSection:
    enabled: bool = _field(True)
    host: str = _field("127.0.0.1")
    port: int = _field(7701, 0, 65535)
    path: str = _field("/ws")
    max_message_bytes: int = _field(1048576, 1024, 64 * 1048576)
    max_handshake_bytes: int = _field(16384, 1024, 1048576)


@dataclasses.dataclass
class LimitsSection:
    max_frame_bytes: int = _field(65536, 256, 16 * 1048576)
    max_body_bytes: int = _field(16384, 1, 1048576)
    max_meta_bytes: int = _field(8192, 0, 1048576)
    outbound_queue: int = _field(1024, 8, 1_000_000)
    max_connections: int = _field(100_000, 1, 10_000_000)
    sync_max_convs: int = _field(500, 1, 100_000)
    unread_count_cap: int = _field(99_999, 1, 10_000_000)
    max_notices: int = _field(200, 1, 100_000)
    max_notice_users: int = _field(10_000, 1, 10_000_000)


@dataclasses.dataclass
class SessionSection:
    auth_timeout: float = _field(5.0, 0.1, 3600.0)
    heartbeat: int = _field(30, 1, 3600)
    heartbeat_timeout: float = _field(45.0, 1.0, 86400.0)
    max_devices: int = _field(3, 1, 100)


@dataclasses.dataclass
class AuthSection:
    open_registration: bool = _field(True)
    token_ttl_s: int = _field(30 * 86400, 60, 10 * 365 * 86400)
    min_password_len: int = _field(8, 1, 1024)
    argon2_time_cost: int = _field(2, 1, 100)
    argon2_memory_kib: int = _field(19456, 8, 4 * 1048576)
    argon2_parallelism: int = _field(1, 1, 64)
    login_per_user_per_min: int = _field(10, 1, 100_000)
    login_per_addr_per_min: int = _field(30, 1, 1_000_000)


@dataclasses.dataclass
class RateSection:
    send_per_s: float = _field(10.0, 0.001, 1e9)
    send_burst: int = _field(20, 1, 1_000_000_000)
    typing_per_s: float = _field(2.0, 0.001, 1e9)
    typing_burst: int = _field(5, 1, 1_000_000_000)
    receipts_per_s: float = _field(20.0, 0.001, 1e9)
    receipts_burst: int = _field(50, 1, 1_000_000_000)
    requests_per_s: float = _field(50.0, 0.001, 1e9)
    requests_burst: int = _field(100, 1, 1_000_000_000)
    friend_requests_per_h: int = _field(20, 1, 1_000_000_000)


@dataclasses.dataclass
class ChatSection:
    require_friendship: bool = _field(True)
    recall_window_s: int = _field(120, 0, 86400 * 365)


@dataclasses.dataclass
class GroupsSection:
    max_members: int = _field(500, 2, 100_000)
    cache_size: int = _field(10_000, 1, 10_000_000)


@dataclasses.dataclass
class DatabaseSection:
    dsn: str = _field("")
    pool_size: int = _field(8, 1, 1000)
    fsync: bool = _field(True)
    connect_timeout: float = _field(5.0, 0.1, 600.0)
    query_timeout: float = _field(10.0, 0.1, 3600.0)


@dataclasses.dataclass
class BatchSection:
    max_rows: int = _field(512, 1, 100_000)
    max_delay_ms: float = _field(0.0, 0.0, 10_000.0)
    max_queue: int = _field(16384, 1, 10_000_000)
    commit_timeout: float = _field(5.0, 0.1, 600.0)
    retry_backoff: float = _field(0.5, 0.0, 60.0)


@dataclasses.dataclass
class HubSection:
    shards: int = _field(8, 1, 1024)
    sweep_interval: float = _field(5.0, 0.05, 3600.0)


@dataclasses.dataclass
class HttpSection:
    enabled: bool = _field(True)
    host: str = _field("127.0.0.1")
    port: int = _field(7780, 0, 65535)
    max_body_bytes: int = _field(4 * 1048576, 1024, 256 * 1048576)
    max_json_body_bytes: int = _field(65536, 1024, 16 * 1048576)
    max_pollers_per_user: int = _field(4, 1, 1000)
    max_pollers: int = _field(500, 1, 1_000_000)
    poll_timeout_s: float = _field(25.0, 0.0, 60.0)
    poll_max_timeout_s: float = _field(60.0, 0.0, 3600.0)
    poll_max_messages: int = _field(200, 1, 10_000)
    search_max_limit: int = _field(100, 1, 10_000)
    admin_token: str = _field("")
    static_dir: str = _field("")
    max_requests: int = _field(1000, 1, 1_000_000)
    keep_alive_s: float = _field(5.0, 0.1, 3600.0)
    body_timeout_s: float = _field(30.0, 0.1, 3600.0)


@dataclasses.dataclass
class WeChatSection:
    #: [[wechat.accounts]] tables: appid, token (the secret), owners.
    accounts: list = dataclasses.field(  # type: ignore[type-arg]
        default_factory=list, metadata={"lo": None, "hi": None, "choices": ()}
    )


@dataclasses.dataclass
class LogSection:
    level: str = _field("info", choices=("debug", "info", "warning", "error"))
    format: str = _field("text", choices=("text", "json"))


@dataclasses.dataclass
class Config:
    server: ServerSection = dataclasses.field(default_factory=ServerSection)
    tcp: TcpSection = dataclasses.field(default_factory=TcpSection)
    websocket: WebSocketSection = dataclasses.field(default_factory=WebSocketSection)
    limits: LimitsSection = dataclasses.field(default_factory=LimitsSection)
    session: SessionSection = dataclasses.field(default_factory=SessionSection)
    auth: AuthSection = dataclasses.field(default_factory=AuthSection)
    rate: RateSection = dataclasses.field(default_factory=RateSection)
    chat: ChatSection = dataclasses.field(default_factory=ChatSection)
    groups: GroupsSection = dataclasses.field(default_factory=GroupsSection)
    database: DatabaseSection = dataclasses.field(default_factory=DatabaseSection)
    batch: BatchSection = dataclasses.field(default_factory=BatchSection)
    hub: HubSection = dataclasses.field(default_factory=HubSection)
    http: HttpSection = dataclasses.field(default_factory=HttpSection)
    wechat: WeChatSection = dataclasses.field(default_factory=WeChatSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """Return a copy with some options changed, validated: ``cfg.replace(tcp={"port": 0})``."""
        raw = dataclasses.asdict(self)
        for name, values in sections.items():
            if name not in raw:
                raise ConfigError(f"{name}: unknown section")
            raw[name].update(values)
        return from_mapping(raw)


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _coerce(key: str, f: dataclasses.Field[Any], value: Any, from_env: bool) -> Any:
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    if typ == "list":
        if from_env:
            raise ConfigError(f"{key}: cannot be set from the environment; use server.toml")
        return _wechat_accounts(key, value)
    if from_env:
        value = _parse_env(key, typ, value)
    if typ == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif typ == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif typ == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise ConfigError(f"{key}: expected one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: must be at least {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be at most {hi}, got {value!r}")
    return value


_USER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
MIN_SECRET_CHARS = 16


def _wechat_accounts(key: str, value: Any) -> list[dict[str, Any]]:
    """Validate ``[[wechat.accounts]]``: each ``{appid, token, owners}``."""
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of tables ([[wechat.accounts]])")
    seen: set[str] = set()
    out = []
    for i, acc in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(acc, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(acc) - {"appid", "token", "owners"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown option")
        appid = acc.get("appid")
        if (
            not isinstance(appid, str)
            or not 1 <= len(appid) <= 128
            or ":" in appid
            or not appid.isprintable()
            or any(c.isspace() for c in appid)
        ):
            raise ConfigError(f"{where}.appid: expected 1-128 characters, no ':' or spaces")
        if appid in seen:
            raise ConfigError(f"{where}.appid: {appid!r} is listed twice")
        seen.add(appid)
        token = acc.get("token")
        if not isinstance(token, str) or len(token) < MIN_SECRET_CHARS:
            raise ConfigError(f"{where}.token: expected a secret of at least 16 characters")
        owners = acc.get("owners")
        if (
            not isinstance(owners, list)
            or not owners
            or not all(
                isinstance(o, str) and 1 <= len(o) <= 64 and set(o) <= _USER_CHARS for o in owners
            )
        ):
            raise ConfigError(f"{where}.owners: expected a non-empty list of user names")
        out.append({"appid": appid, "token": token, "owners": list(dict.fromkeys(owners))})
    return out


def _parse_env(key: str, typ: str, text: str) -> Any:
    if typ == "bool":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if typ == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if typ == "float":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    return text


def from_mapping(raw: Mapping[str, Any], *, env: Mapping[str, str] | None = None) -> Config:
    """Build a validated :class:`Config` from parsed TOML and optional environment.

    Raises:
        ConfigError: naming the first bad key.
    """
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{name}: unknown section")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table")
    for name, factory in _SECTIONS.items():
        section = factory()
        fields = {f.name: f for f in dataclasses.fields(section)}
        for key, value in raw.get(name, {}).items():
            if key not in fields:
                raise ConfigError(f"{name}.{key}: unknown option")
            setattr(section, key, _coerce(f"{name}.{key}", fields[key], value, False))
        sections[name] = section
    if env:
        for var, text in env.items():
            if not var.startswith("IMSERVER_") or var in ("IMSERVER_CONFIG",):
                continue
            if var == "IMSERVER_DSN":
                sections["database"].dsn = text
                continue
            rest = var[len("IMSERVER_") :].lower()
            section_name, _, key = rest.partition("_")
            if section_name not in sections:
                raise ConfigError(f"{var}: unknown section {section_name!r}")
            fields = {f.name: f for f in dataclasses.fields(sections[section_name])}
            if key not in fields:
                raise ConfigError(f"{var}: unknown option {section_name}.{key}")
            value = _coerce(f"{var} ({section_name}.{key})", fields[key], text, True)
            setattr(sections[section_name], key, value)
    cfg = Config(**sections)
    if cfg.session.heartbeat_timeout <= cfg.session.heartbeat:
        raise ConfigError("session.heartbeat_timeout: must be greater than session.heartbeat")
    if cfg.limits.max_body_bytes > cfg.limits.max_frame_bytes:
        raise ConfigError("limits.max_body_bytes: must not exceed limits.max_frame_bytes")
    if cfg.http.admin_token and len(cfg.http.admin_token) < MIN_SECRET_CHARS:
        raise ConfigError("http.admin_token: at least 16 characters (or empty to disable)")
    if cfg.http.max_pollers >= cfg.http.max_requests:
        raise ConfigError("http.max_pollers: must be below http.max_requests")
    if cfg.http.poll_timeout_s > cfg.http.poll_max_timeout_s:
        raise ConfigError("http.poll_timeout_s: must not exceed http.poll_max_timeout_s")
    if cfg.websocket.max_message_bytes < cfg.limits.max_frame_bytes:
        raise ConfigError("websocket.max_message_bytes: must be at least limits.max_frame_bytes")
    return cfg


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (or only defaults when None) plus ``IMSERVER_*`` overrides.

    Raises:
        ConfigError: the file is unreadable, not TOML, or holds a bad option.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_mapping(raw, env=os.environ if env is None else env)
