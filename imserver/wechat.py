"""Gewechat callbacks turned into plain data, as pure functions (no I/O).

The WeChat gateway (Gewechat) POSTs one JSON event per request to the
callback URL (PROTOCOL §10). :func:`parse_callback` takes the raw body of one
such POST and returns one of three things:

- :class:`Handshake`: the ``{"testMsg": ..., "token": ...}`` event the gateway
  sends when the callback URL is set;
- :class:`Ignored`: any event whose ``TypeName`` is not ``AddMsg``
  (``ModContacts``, ``DelContacts``, ``Offline``, ...), which the caller
  answers 200 and logs;
- :class:`WeChatMessage`: an ``AddMsg`` event, with the conversation, sender,
  kind, body and timestamp already worked out.

Anything else raises :class:`~protocol.errors.OpError`: ``too_large`` for a
body over the limit (checked before parsing), ``invalid`` for everything
wrong with the body, with a message ``"<field>: <what is wrong>"``. Nothing
else escapes, whatever the bytes. Authentication, storage, de-duplication
(on :func:`dedupe_key`) and pushes are the caller's.

The mapping (PROTOCOL §10):

- Top-level keys come as ``TypeName``/``Appid``/``Data``/``Wxid`` or as
  ``type_name``/``appid``/``data``/``wxid``; when both spellings are present
  (and not null) the capitalised one wins. Error messages name the key as it
  was spelled, or the capitalised form when it is missing.
- Inside ``Data``, string fields come wrapped, ``{"string": "..."}``, or bare.
  A wrapper without ``"string"`` (or with ``"string": null``) is the empty
  string. Integer fields are JSON integers or decimal strings of ASCII digits
  (booleans and floats are refused), so the 64-bit ``NewMsgId`` stays exact.
- Direction: when ``FromUserName`` is the account's ``Wxid`` the message was
  sent by the account and the peer is ``ToUserName``; otherwise (also when the
  event has no ``Wxid``) it is incoming and the peer is ``FromUserName``.
- A peer ending in ``@chatroom`` is a group chat. In an incoming group
  message, a ``Content`` of the form ``<wxid>:\\n<text>`` names the real
  sender and the body is ``<text>``; without that prefix (system messages,
  say) the sender is the chatroom itself. In a group message the account sent,
  the sender is the account, and a ``<own wxid>:\\n`` prefix, if any, is
  stripped from the body.
- ``kind`` follows ``MsgType`` (:data:`KINDS`), else ``custom``; ``ts`` is
  ``CreateTime`` (seconds) × 1000; ``meta`` carries ``new_msg_id`` as a
  decimal string, the integer ``msg_type``, and ``push_content`` when it is a
  non-empty string.

Bounds on what goes into identifiers: the appid and every wxid (account,
``FromUserName``, ``ToUserName``, the group sender prefix) are 1-128
characters with no whitespace and no control, format or surrogate characters;
an appid also has no ``:`` (it separates the parts of ``wx:<appid>:<peer>``),
and neither has a group sender prefix (it ends at the first ``:``).
``NewMsgId`` is 1..2**63-1 (a PostgreSQL ``bigint``), ``MsgId`` 0..2**63-1,
``MsgType`` and ``CreateTime`` 0..2**32-1 (``uint32`` in WeChat).

Because an ``AddMsg`` payload is kept whole, every string in it (keys
included) must be storable: U+0000 and unpaired surrogates (which JSON
escapes can produce) are ``invalid``, and so are ``NaN``, ``Infinity`` and
numbers too large for a float. The body must be UTF-8 (no BOM).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any, Final, TypeAlias

from protocol.errors import ErrorCode, OpError

__all__ = [
    "KINDS",
    "Callback",
    "Handshake",
    "Ignored",
    "WeChatMessage",
    "dedupe_key",
    "kind_for_msg_type",
    "parse_callback",
]

#: ``MsgType`` → message ``kind``; any other type is ``custom``.
KINDS: Final[Mapping[int, str]] = {
    1: "text",
    3: "image",
    34: "voice",
    43: "video",
    47: "emoji",
    48: "location",
    49: "app",
    10000: "system",
    10002: "system",
}

#: The suffix that marks a group chat's id.
CHATROOM_SUFFIX: Final = "@chatroom"
#: Most characters in an appid or wxid.
MAX_ID_CHARS: Final = 128
#: Most characters in a ``TypeName``.
MAX_TYPE_NAME_CHARS: Final = 64
#: Most characters in a handshake ``token`` kept (a longer one reads as None).
MAX_TOKEN_CHARS: Final = 1024

_MAX_INT64: Final = 2**63 - 1
_MAX_UINT32: Final = 2**32 - 1
# Longest decimal string accepted for an integer field (2**64 has 20 digits).
_MAX_DIGITS: Final = 20
_DIGITS: Final = re.compile(r"[0-9]+", re.ASCII)
# U+0000 or any surrogate code point (only unpaired ones survive JSON decoding).
_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
_BAD_ID_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Zs"})


@dataclasses.dataclass(frozen=True, slots=True)
class Handshake:
    """The gateway's test event, sent when the callback URL is set.

    ``token`` is the event's ``token`` when it is a string of at most
    :data:`MAX_TOKEN_CHARS` characters without control characters, else None.
    """

    token: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Ignored:
    """An event that is answered 200 and logged, not stored.

    ``appid`` is None when the event names no appid.
    """

    type_name: str
    appid: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class WeChatMessage:
    """One ``AddMsg`` event, mapped to a message (PROTOCOL §10).

    Attributes:
        appid: The gateway device (``Appid``).
        account_wxid: The logged-in account (``Wxid``), None when absent.
        new_msg_id: ``Data.NewMsgId``, exact.
        msg_id: ``Data.MsgId``, None when absent or not a valid integer.
        msg_type: ``Data.MsgType``.
        conv: ``wx:<appid>:<peer>``.
        peer: The other party: a wxid, or a ``...@chatroom`` id.
        sender: ``wx:<wxid>`` of who sent it (``wx:<chatroom>`` for a group
            message with no sender prefix).
        kind: From ``msg_type`` (:func:`kind_for_msg_type`).
        body: ``Data.Content``, without a group sender prefix; ``""`` when
            absent.
        ts: ``Data.CreateTime`` × 1000 (ms since the epoch).
        meta: ``{"new_msg_id": "<decimal>", "msg_type": int}``, plus
            ``"push_content"`` when present.
        raw: The whole parsed payload, as received.
    """

    appid: str
    account_wxid: str | None
    new_msg_id: int
    msg_id: int | None
    msg_type: int
    conv: str
    peer: str
    sender: str
    kind: str
    body: str
    ts: int
    meta: dict[str, Any]
    raw: dict[str, Any]

    @property
    def is_group(self) -> bool:
        """Whether the message belongs to a group chat."""
        return self.peer.endswith(CHATROOM_SUFFIX)

    @property
    def outgoing(self) -> bool:
        """Whether the account itself sent the message."""
        return self.account_wxid is not None and self.sender == f"wx:{self.account_wxid}"


#: What :func:`parse_callback` returns.
Callback: TypeAlias = Handshake | Ignored | WeChatMessage


def kind_for_msg_type(msg_type: int) -> str:
    """The message ``kind`` for a WeChat ``MsgType`` (``custom`` if unknown)."""
    return KINDS.get(msg_type, "custom")


def dedupe_key(msg: WeChatMessage) -> tuple[str, int]:
    """The key under which a message is stored once: ``(appid, new_msg_id)``."""
    return (msg.appid, msg.new_msg_id)


def parse_callback(body: bytes, *, max_body_bytes: int) -> Callback:
    """Turn the raw body of one Gewechat callback POST into plain data.

    Args:
        body: The request body, as received.
        max_body_bytes: The largest body accepted.

    Returns:
        A :class:`Handshake`, an :class:`Ignored` event or a
        :class:`WeChatMessage`.

    Raises:
        OpError: ``too_large`` when ``body`` is longer than ``max_body_bytes``;
            ``invalid`` when it is not UTF-8 JSON, not an object, has no
            usable ``TypeName``, or is an ``AddMsg`` with a needed field
            missing or ill-typed. The message names the field.
    """
    if len(body) > max_body_bytes:
        raise OpError(
            ErrorCode.TOO_LARGE, f"body: {len(body)} bytes, over the limit of {max_body_bytes}"
        )
    payload = _load(body)
    if "testMsg" in payload:
        return Handshake(_token(payload.get("token")))
    type_key, type_name = _top(payload, "TypeName", "type_name")
    if type_name is None:
        raise _invalid(type_key, "missing")
    if not isinstance(type_name, str) or not 1 <= len(type_name) <= MAX_TYPE_NAME_CHARS:
        raise _invalid(type_key, f"must be a string of 1-{MAX_TYPE_NAME_CHARS} characters")
    if any(unicodedata.category(c) in _BAD_ID_CATEGORIES for c in type_name):
        raise _invalid(type_key, "has control or space characters")
    appid_key, appid = _top(payload, "Appid", "appid")
    if type_name != "AddMsg":
        return Ignored(type_name, None if appid is None else _appid(appid_key, appid))
    if appid is None:
        raise _invalid(appid_key, "missing")
    return _add_msg(payload, _appid(appid_key, appid))


def _invalid(field: str, what: str) -> OpError:
    return OpError(ErrorCode.INVALID, f"{field}: {what}")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("body", "not UTF-8") from None
    try:
        payload = json.loads(text, parse_float=_parse_float, parse_constant=_parse_constant)
    except (ValueError, RecursionError) as e:
        # JSONDecodeError, a bad number, too many digits, nesting too deep.
        raise _invalid("body", f"not JSON ({type(e).__name__})") from None
    if not isinstance(payload, dict):
        raise _invalid("body", "not a JSON object")
    return payload


def _top(payload: dict[str, Any], name: str, alt: str) -> tuple[str, Any]:
    """A top-level field under either spelling: (the key to name, value or None)."""
    value = payload.get(name)
    if value is not None:
        return name, value
    value = payload.get(alt)
    if value is not None:
        return alt, value
    return name, None


def _token(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS:
        return None
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        return None
    return value


def _is_id(value: str) -> bool:
    return 1 <= len(value) <= MAX_ID_CHARS and not any(
        c.isspace() or unicodedata.category(c) in _BAD_ID_CATEGORIES for c in value
    )


def _wxid(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(field, "must be a string")
    if not _is_id(value):
        raise _invalid(
            field, f"must be 1-{MAX_ID_CHARS} characters, no spaces or control characters"
        )
    return value


def _appid(field: str, value: Any) -> str:
    appid = _wxid(field, value)
    if ":" in appid:
        raise _invalid(field, "must not contain ':'")
    return appid


def _wrapped_str(field: str, value: Any) -> str | None:
    """A Data string field, bare or ``{"string": ...}``; None when absent."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        inner = value.get("string")
        if inner is None:
            return ""
        if isinstance(inner, str):
            return inner
        raise _invalid(f"{field}.string", "must be a string")
    raise _invalid(field, 'must be a string or {"string": ...}')


def _int(field: str, value: Any, lo: int, hi: int) -> int:
    """A Data integer field: a JSON integer or a decimal string, in lo..hi."""
    if value is None:
        raise _invalid(field, "missing")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _invalid(field, "must be an integer or a decimal string")
    if isinstance(value, str) and (len(value) > _MAX_DIGITS or not _DIGITS.fullmatch(value)):
        raise _invalid(field, "must be an integer or a decimal string")
    number = int(value)
    if not lo <= number <= hi:
        raise _invalid(field, f"must be in {lo}..{hi}")
    return number


def _check_storable(payload: dict[str, Any]) -> None:
    """Refuse U+0000 and unpaired surrogates anywhere in the payload."""
    stack: list[Any] = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise _invalid("body", "a string holds U+0000 or an unpaired surrogate")
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _add_msg(payload: dict[str, Any], appid: str) -> WeChatMessage:
    data_key, data = _top(payload, "Data", "data")
    if data is None:
        raise _invalid(data_key, "missing")
    if not isinstance(data, dict):
        raise _invalid(data_key, "must be an object")
    wxid_key, wxid_value = _top(payload, "Wxid", "wxid")
    account = None if wxid_value is None else _wxid(wxid_key, wxid_value)

    def field(name: str) -> str:
        return f"{data_key}.{name}"

    new_msg_id = _int(field("NewMsgId"), data.get("NewMsgId"), 1, _MAX_INT64)
    msg_type = _int(field("MsgType"), data.get("MsgType"), 0, _MAX_UINT32)
    create_time = _int(field("CreateTime"), data.get("CreateTime"), 0, _MAX_UINT32)
    ends: list[str] = []
    for name in ("FromUserName", "ToUserName"):
        value = _wrapped_str(field(name), data.get(name))
        if value is None:
            raise _invalid(field(name), "missing")
        ends.append(_wxid(field(name), value))
    from_user, to_user = ends
    content = _wrapped_str(field("Content"), data.get("Content")) or ""
    try:
        msg_id: int | None = _int(field("MsgId"), data.get("MsgId"), 0, _MAX_INT64)
    except OpError:
        msg_id = None
    try:
        push_content = _wrapped_str(field("PushContent"), data.get("PushContent"))
    except OpError:
        push_content = None
    _check_storable(payload)

    outgoing = account is not None and from_user == account
    peer = to_user if outgoing else from_user
    body = content
    if account is not None and outgoing:
        sender_id = account
        if peer.endswith(CHATROOM_SUFFIX) and content.startswith(f"{account}:\n"):
            body = content[len(account) + 2 :]
    elif peer.endswith(CHATROOM_SUFFIX):
        prefix, sep, rest = content.partition(":")
        if sep and rest.startswith("\n") and _is_id(prefix):
            sender_id, body = prefix, rest[1:]
        else:
            sender_id = peer
    else:
        sender_id = from_user

    meta: dict[str, Any] = {"new_msg_id": str(new_msg_id), "msg_type": msg_type}
    if push_content:
        meta["push_content"] = push_content
    return WeChatMessage(
        appid=appid,
        account_wxid=account,
        new_msg_id=new_msg_id,
        msg_id=msg_id,
        msg_type=msg_type,
        conv=f"wx:{appid}:{peer}",
        peer=peer,
        sender=f"wx:{sender_id}",
        kind=kind_for_msg_type(msg_type),
        body=body,
        ts=create_time * 1000,
        meta=meta,
        raw=payload,
    )
