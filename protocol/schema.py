"""One schema per client operation, and :func:`validate` to apply it.

Theory of operation
-------------------

:data:`OPS` is data: for each operation a client may send (PROTOCOL.md §3,
§5-§8), an :class:`OpSchema` listing its fields as :class:`FieldSpec` values
plus the rules that tie fields together ("exactly one of ``to``, ``group``,
``conv``"). At import time each schema is compiled into a small validator
(one closure per field, specialised to the field's type), so that
:func:`validate` on the hot path (``send``) is a loop over a tuple with no
generic machinery per call.

The bounds here are hard sanity bounds, the same for every deployment. The
server applies its configurable limits (``max_body_bytes``,
``groups.max_members``, ...) on top, with their own error codes
(``too_large``, ``conflict``).

Conventions:

* A JSON ``null`` counts as absent: after :func:`validate`, every field with
  a default is present, and every other optional field is either present
  with a valid value or absent (a ``null`` is removed).
* ``bool`` is a subclass of ``int`` in Python, but not here: ``true`` where
  an integer is expected is ``invalid``, and so is ``1`` where a boolean is.
* Unknown extra fields are left alone (forward compatibility).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar

from .errors import ErrorCode, OpError

__all__ = [
    "CLIENT_OPS",
    "GROUP_ROLES",
    "MAX_BODY_CHARS",
    "MAX_ID",
    "MAX_META_DEPTH",
    "OPS",
    "PRESENCE_STATUSES",
    "SEND_KINDS",
    "FieldSpec",
    "FieldType",
    "OpSchema",
    "is_user_name",
    "safe_rid",
    "validate",
]

#: The largest id or sequence number: JavaScript reads integers exactly up to here.
MAX_ID: Final = 2**53 - 1
#: How deeply ``meta`` may nest maps and lists (``{}`` alone is depth 1).
MAX_META_DEPTH: Final = 16
#: ``body`` sanity bound in characters; the server's ``max_body_bytes`` is smaller.
MAX_BODY_CHARS: Final = 1 << 20

_USER_PATTERN: Final = "[A-Za-z0-9_.-]{1,64}"
_user_match: Final = re.compile(_USER_PATTERN).fullmatch
_USER_HINT: Final = "must be a user name (1-64 of A-Z a-z 0-9 _ . -)"
#: PostgreSQL's text and jsonb cannot hold U+0000: refused in every string field
#: and inside maps, so one client's bad string cannot fail a shared batch commit.
_NUL_HINT: Final = "must not contain U+0000"


def is_user_name(value: object) -> bool:
    """Tell whether ``value`` is a valid user name (PROTOCOL.md §4).

    Args:
        value: Anything.

    Returns:
        ``True`` for a ``str`` of 1-64 characters from ``A-Z a-z 0-9 _ . -``.
    """
    return type(value) is str and _user_match(value) is not None


class FieldType(enum.Enum):
    """The type of a field's value."""

    STR = "str"  #: a string; ``min_len``/``max_len`` in characters, maybe ``choices``
    USER = "user"  #: a user name (PROTOCOL.md §4)
    INT = "int"  #: an integer (never a bool); ``min``/``max`` bound the value
    BOOL = "bool"  #: ``true`` or ``false`` (never an integer)
    USER_LIST = "user_list"  #: a list of user names; ``min_len``/``max_len`` entries
    MAP = "map"  #: a map with string keys; ``max_depth`` bounds its nesting


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field of an operation is checked.

    Attributes:
        type: The type of the value.
        required: Whether the field must be present (and not ``null``).
        default: The value filled in when the field is absent, or ``None``
            for no default (the field then stays absent).
        min: The smallest value of an ``INT``.
        max: The largest value of an ``INT``.
        min_len: The fewest characters of a ``STR``, or entries of a ``USER_LIST``.
        max_len: The most characters of a ``STR``, or entries of a ``USER_LIST``.
        choices: The allowed values of a ``STR``.
        max_depth: How deeply a ``MAP`` may nest.
    """

    type: FieldType
    required: bool = False
    default: Any = None
    min: int | None = None
    max: int | None = None
    min_len: int = 0
    max_len: int | None = None
    choices: frozenset[str] | None = None
    max_depth: int | None = None


@dataclass(frozen=True, slots=True)
class OpSchema:
    """The fields of one operation and the rules that tie them together.

    Attributes:
        name: The ``op``.
        fields: Field name to spec, ``rid`` included, in checking order.
        exactly_one: Fields of which exactly one must be present.
        at_least_one: Fields of which at least one must be present.
        at_most_one: Fields of which at most one may be present.
    """

    name: str
    fields: Mapping[str, FieldSpec]
    exactly_one: tuple[str, ...] = ()
    at_least_one: tuple[str, ...] = ()
    at_most_one: tuple[str, ...] = ()


# ---------------------------------------------------------------- the table

_RID: Final = FieldSpec(FieldType.INT, min=0, max=MAX_ID)
_USER: Final = FieldSpec(FieldType.USER, required=True)
_GROUP: Final = FieldSpec(FieldType.STR, required=True, min_len=1, max_len=64)
_CONV: Final = FieldSpec(FieldType.STR, required=True, min_len=1, max_len=300)
_SEQ: Final = FieldSpec(FieldType.INT, required=True, min=0, max=MAX_ID)
_MID: Final = FieldSpec(FieldType.INT, required=True, min=1, max=MAX_ID)
_DEVICE: Final = FieldSpec(FieldType.STR, default="default", min_len=1, max_len=64)
_PASSWORD: Final = FieldSpec(FieldType.STR, required=True, min_len=1, max_len=1024)
_GROUP_NAME: Final = FieldSpec(FieldType.STR, required=True, min_len=1, max_len=128)
_USERS: Final = FieldSpec(FieldType.USER_LIST, required=True, min_len=1, max_len=1000)

#: Message kinds a client may send (PROTOCOL.md §5).
SEND_KINDS: Final = frozenset({"text", "image", "voice", "video", "file", "location", "custom"})
#: Presence a client may set (PROTOCOL.md §8).
PRESENCE_STATUSES: Final = frozenset({"online", "away", "busy"})
#: Group roles (PROTOCOL.md §8).
GROUP_ROLES: Final = frozenset({"owner", "admin", "member"})


def _op(
    name: str,
    /,
    *,
    exactly_one: tuple[str, ...] = (),
    at_least_one: tuple[str, ...] = (),
    at_most_one: tuple[str, ...] = (),
    **fields: FieldSpec,
) -> OpSchema:
    return OpSchema(
        name=name,
        fields=MappingProxyType({"rid": _RID, **fields}),
        exactly_one=exactly_one,
        at_least_one=at_least_one,
        at_most_one=at_most_one,
    )


_SCHEMAS: Final = (
    # §3 session
    _op(
        "auth",
        token=FieldSpec(FieldType.STR, required=True, min_len=1, max_len=256),
        device=_DEVICE,
    ),
    _op("login", user=_USER, password=_PASSWORD, device=_DEVICE),
    _op("register", user=_USER, password=_PASSWORD, device=_DEVICE),
    _op("logout"),
    _op("ping"),
    # §5 sending
    _op(
        "send",
        exactly_one=("to", "group", "conv"),
        to=FieldSpec(FieldType.USER),
        group=FieldSpec(FieldType.STR, min_len=1, max_len=64),
        conv=FieldSpec(FieldType.STR, min_len=1, max_len=300),
        cid=FieldSpec(FieldType.STR, required=True, min_len=1, max_len=64),
        kind=FieldSpec(FieldType.STR, default="text", choices=SEND_KINDS),
        body=FieldSpec(FieldType.STR, default="", max_len=MAX_BODY_CHARS),
        meta=FieldSpec(FieldType.MAP, max_depth=MAX_META_DEPTH),
        mentions=FieldSpec(FieldType.USER_LIST, max_len=500),
        reply_to=FieldSpec(FieldType.INT, min=1, max=MAX_ID),
    ),
    # §6 catching up
    _op("sync"),
    _op(
        "history",
        at_most_one=("after_seq", "before_seq"),
        conv=_CONV,
        after_seq=FieldSpec(FieldType.INT, min=0, max=MAX_ID),
        before_seq=FieldSpec(FieldType.INT, min=0, max=MAX_ID),
        limit=FieldSpec(FieldType.INT, default=50, min=1, max=200),
    ),
    # §7 state of messages and conversations
    _op("read", conv=_CONV, seq=_SEQ),
    _op("recv", conv=_CONV, seq=_SEQ),
    _op("recall", mid=_MID),
    _op("delete", mid=_MID),
    _op(
        "conv_set",
        at_least_one=("pinned", "muted"),
        conv=_CONV,
        pinned=FieldSpec(FieldType.BOOL),
        muted=FieldSpec(FieldType.BOOL),
    ),
    _op(
        "typing",
        exactly_one=("to", "group"),
        to=FieldSpec(FieldType.USER),
        group=FieldSpec(FieldType.STR, min_len=1, max_len=64),
        on=FieldSpec(FieldType.BOOL, required=True),
    ),
    # §8 friends
    _op("friend_request", to=_USER, note=FieldSpec(FieldType.STR, default="", max_len=256)),
    _op("friend_accept", user=_USER),
    _op("friend_reject", user=_USER),
    _op("friend_remove", user=_USER),
    _op("block", user=_USER),
    _op("unblock", user=_USER),
    _op("friends"),
    _op("friend_requests"),
    # §8 presence
    _op("presence", status=FieldSpec(FieldType.STR, required=True, choices=PRESENCE_STATUSES)),
    _op("presence_query", users=FieldSpec(FieldType.USER_LIST, required=True, max_len=500)),
    # §8 groups
    _op(
        "group_create",
        name=_GROUP_NAME,
        members=FieldSpec(FieldType.USER_LIST, required=True, max_len=1000),
    ),
    _op("group_info", group=_GROUP),
    _op(
        "group_update",
        group=_GROUP,
        name=FieldSpec(FieldType.STR, min_len=1, max_len=128),
        avatar=FieldSpec(FieldType.STR, max_len=1024),
    ),
    _op("group_dissolve", group=_GROUP),
    _op("group_add", group=_GROUP, users=_USERS),
    _op("group_remove", group=_GROUP, users=_USERS),
    _op("group_leave", group=_GROUP),
    _op(
        "group_role",
        group=_GROUP,
        user=_USER,
        role=FieldSpec(FieldType.STR, required=True, choices=GROUP_ROLES),
    ),
    _op("groups"),
    # §8 notices
    _op("notices"),
    _op("notice_read", id=FieldSpec(FieldType.INT, required=True, min=1, max=MAX_ID)),
)

#: Every operation a client may send, by name.
OPS: Final[Mapping[str, OpSchema]] = MappingProxyType({s.name: s for s in _SCHEMAS})
#: The names of :data:`OPS`.
CLIENT_OPS: Final = frozenset(OPS)


# ---------------------------------------------------------------- compiling

_T = TypeVar("_T")
_Check = Callable[[Any], None]
_Validator = Callable[[dict[str, Any]], dict[str, Any]]


def _invalid(name: str, what: str) -> OpError:
    return OpError(ErrorCode.INVALID, f"{name}: {what}")


def _between(lo: int, hi: int | None, unit: str) -> str:
    if hi is None:
        return f"at least {lo} {unit}"
    return f"{lo} to {hi} {unit}"


def _check_str(name: str, spec: FieldSpec) -> _Check:
    if spec.choices is not None:
        choices = spec.choices
        what = "must be one of " + ", ".join(sorted(choices))

        def check_choice(value: Any) -> None:
            if type(value) is not str or value not in choices:
                raise _invalid(name, what)

        return check_choice

    lo = spec.min_len
    hi = spec.max_len if spec.max_len is not None else math.inf
    length = "must be " + _between(lo, spec.max_len, "characters")

    def check_str(value: Any) -> None:
        if type(value) is not str:
            raise _invalid(name, "must be a string")
        if not lo <= len(value) <= hi:
            raise _invalid(name, length)
        if "\x00" in value:
            raise _invalid(name, _NUL_HINT)

    return check_str


def _check_user(name: str, spec: FieldSpec) -> _Check:
    def check_user(value: Any) -> None:
        if type(value) is not str or _user_match(value) is None:
            raise _invalid(name, _USER_HINT)

    return check_user


def _check_int(name: str, spec: FieldSpec) -> _Check:
    lo = spec.min if spec.min is not None else -math.inf
    hi = spec.max if spec.max is not None else math.inf
    if spec.min is not None and spec.max is not None:
        bounds = f"must be between {spec.min} and {spec.max}"
    elif spec.min is not None:
        bounds = f"must be at least {spec.min}"
    else:
        bounds = f"must be at most {spec.max}"

    def check_int(value: Any) -> None:
        if type(value) is not int:
            raise _invalid(name, "must be an integer")
        if not lo <= value <= hi:
            raise _invalid(name, bounds)

    return check_int


def _check_bool(name: str, spec: FieldSpec) -> _Check:
    def check_bool(value: Any) -> None:
        if type(value) is not bool:
            raise _invalid(name, "must be true or false")

    return check_bool


def _check_user_list(name: str, spec: FieldSpec) -> _Check:
    lo = spec.min_len
    hi = spec.max_len if spec.max_len is not None else math.inf
    length = "must have " + _between(lo, spec.max_len, "entries")

    def check_user_list(value: Any) -> None:
        if type(value) is not list:
            raise _invalid(name, "must be a list of user names")
        if not lo <= len(value) <= hi:
            raise _invalid(name, length)
        for index, entry in enumerate(value):
            if type(entry) is not str or _user_match(entry) is None:
                raise _invalid(f"{name}[{index}]", _USER_HINT)

    return check_user_list


_SCALARS: Final = frozenset({str, int, bool, type(None)})


def _check_map(name: str, spec: FieldSpec) -> _Check:
    max_depth = spec.max_depth if spec.max_depth is not None else math.inf
    too_deep = f"must not nest deeper than {spec.max_depth} levels"

    def check_map(value: Any) -> None:
        if type(value) is not dict:
            raise _invalid(name, "must be a map")
        # Iterative walk: keys must be strings and values JSON-compatible
        # (validate() may see dicts that did not come through the codec).
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > max_depth:
                raise _invalid(name, too_deep)
            if type(node) is dict:
                for key in node:
                    if type(key) is not str:
                        raise _invalid(name, "keys must be strings")
                    if "\x00" in key:
                        raise _invalid(name, _NUL_HINT)
                children = node.values()
            else:
                children = node
            for child in children:
                kind = type(child)
                if kind is str:
                    if "\x00" in child:
                        raise _invalid(name, _NUL_HINT)
                    continue
                if kind in _SCALARS:
                    continue
                if kind is dict or kind is list:
                    stack.append((child, depth + 1))
                elif kind is not float or not math.isfinite(child):
                    raise _invalid(name, "must hold only JSON values")

    return check_map


_CHECK_FACTORIES: Final[Mapping[FieldType, Callable[[str, FieldSpec], _Check]]] = {
    FieldType.STR: _check_str,
    FieldType.USER: _check_user,
    FieldType.INT: _check_int,
    FieldType.BOOL: _check_bool,
    FieldType.USER_LIST: _check_user_list,
    FieldType.MAP: _check_map,
}


def _compile(schema: OpSchema) -> _Validator:
    fields = tuple(
        (name, spec.required, spec.default, _CHECK_FACTORIES[spec.type](name, spec))
        for name, spec in schema.fields.items()
        if name != "rid"  # checked by validate() for every op
    )
    exactly_one = schema.exactly_one
    at_least_one = schema.at_least_one
    at_most_one = schema.at_most_one
    names = ", ".join
    exactly_one_error = f"{names(exactly_one)}: exactly one of them is required"
    at_least_one_error = f"{names(at_least_one)}: at least one of them is required"
    at_most_one_error = f"{names(at_most_one)}: at most one of them is allowed"

    def validate_op(frame: dict[str, Any]) -> dict[str, Any]:
        for name, required, default, check in fields:
            value = frame.get(name)
            if value is None:
                if required:
                    raise _invalid(name, "required")
                if default is not None:
                    frame[name] = default
                elif name in frame:
                    del frame[name]  # an explicit null counts as absent
            else:
                check(value)
        if exactly_one and sum(map(frame.__contains__, exactly_one)) != 1:
            raise OpError(ErrorCode.INVALID, exactly_one_error)
        if at_least_one and not any(map(frame.__contains__, at_least_one)):
            raise OpError(ErrorCode.INVALID, at_least_one_error)
        if at_most_one and sum(map(frame.__contains__, at_most_one)) > 1:
            raise OpError(ErrorCode.INVALID, at_most_one_error)
        return frame

    return validate_op


def _given(value: _T | None) -> _T:
    if value is None:
        raise RuntimeError("the send fast path no longer matches the send schema")
    return value


def _compile_send(schema: OpSchema) -> _Validator:
    """A fast path for ``send``, the hot operation, with the same results.

    The common case (valid ``to``/``group``/``conv``, ``cid``, ``kind`` and
    ``body``) is checked inline, with bounds taken from the table; anything
    unusual (an error, an explicit ``null``) falls back to the generic
    validator, which then decides and words the error. A property test
    checks that both agree.
    """
    slow = _compile(schema)
    fields = schema.fields
    if schema.exactly_one != ("to", "group", "conv") or fields["body"].min_len != 0:
        raise RuntimeError("the send fast path no longer matches the send schema")
    group_lo, group_hi = fields["group"].min_len, _given(fields["group"].max_len)
    conv_lo, conv_hi = fields["conv"].min_len, _given(fields["conv"].max_len)
    cid_lo, cid_hi = fields["cid"].min_len, _given(fields["cid"].max_len)
    kinds, kind_default = _given(fields["kind"].choices), _given(fields["kind"].default)
    body_hi, body_default = _given(fields["body"].max_len), _given(fields["body"].default)
    # The rarer optional fields, checked by their generic checks, in order.
    rare = tuple(
        (name, _CHECK_FACTORIES[spec.type](name, spec))
        for name, spec in fields.items()
        if name in ("meta", "mentions", "reply_to")
    )
    if any(fields[name].required or fields[name].default is not None for name, _ in rare):
        raise RuntimeError("the send fast path no longer matches the send schema")
    user_match = _user_match

    def validate_send(frame: dict[str, Any]) -> dict[str, Any]:
        get = frame.get
        cid = get("cid")
        if type(cid) is not str or not cid_lo <= len(cid) <= cid_hi or "\x00" in cid:
            return slow(frame)
        to = get("to")
        if to is not None:
            if type(to) is not str or user_match(to) is None or "group" in frame or "conv" in frame:
                return slow(frame)
        else:
            group = get("group")
            if group is not None:
                if (
                    type(group) is not str
                    or not group_lo <= len(group) <= group_hi
                    or "\x00" in group
                    or "to" in frame
                    or "conv" in frame
                ):
                    return slow(frame)
            else:
                conv = get("conv")
                if (
                    type(conv) is not str
                    or not conv_lo <= len(conv) <= conv_hi
                    or "\x00" in conv
                    or "to" in frame
                    or "group" in frame
                ):
                    return slow(frame)
        kind = get("kind")
        if kind is None:
            frame["kind"] = kind_default
        elif type(kind) is not str or kind not in kinds:
            return slow(frame)
        body = get("body")
        if body is None:
            frame["body"] = body_default
        elif type(body) is not str or len(body) > body_hi or "\x00" in body:
            return slow(frame)
        for name, check in rare:
            value = get(name)
            if value is None:
                frame.pop(name, None)  # absent, or an explicit null
            else:
                check(value)
        return frame

    return validate_send


_VALIDATORS: Final[Mapping[str, _Validator]] = {
    name: _compile_send(schema) if name == "send" else _compile(schema)
    for name, schema in OPS.items()
}


# ---------------------------------------------------------------- public API


def safe_rid(frame: Mapping[str, Any]) -> int | None:
    """Return the frame's ``rid`` if it is valid, else ``None``.

    Use it to address an error reply when :func:`validate` failed: an invalid
    ``rid`` must not be echoed.

    Args:
        frame: A decoded frame.

    Returns:
        The ``rid``, an ``int`` in 0..2^53-1, or ``None``.
    """
    rid = frame.get("rid")
    if type(rid) is int and 0 <= rid <= MAX_ID:
        return rid
    return None


def validate(frame: dict[str, Any]) -> dict[str, Any]:
    """Check a client frame against the schema of its operation.

    The frame is changed in place: absent fields that have a default are
    filled in and optional fields given as ``null`` are removed.

    Args:
        frame: A decoded frame (from the codec, or any dict).

    Returns:
        ``frame`` itself.

    Raises:
        OpError: ``unknown_op`` for an ``op`` not in :data:`OPS`; ``invalid``
            (message ``"<field>: <what is wrong>"``) for a missing field, a
            value of the wrong type or out of range, or fields that exclude
            or need each other. The peer's fault; the connection stays open.
    """
    op = frame.get("op")
    if type(op) is not str:
        raise OpError(ErrorCode.INVALID, "op: must be a string")
    validate_op = _VALIDATORS.get(op)
    if validate_op is None:
        shown = op if len(op) <= 64 else op[:64] + "..."
        raise OpError(ErrorCode.UNKNOWN_OP, f"unknown op {shown!r}")
    rid = frame.get("rid")
    if rid is not None:
        if type(rid) is not int:
            raise _invalid("rid", "must be an integer")
        if not 0 <= rid <= MAX_ID:
            raise _invalid("rid", f"must be between 0 and {MAX_ID}")
    elif "rid" in frame:
        del frame["rid"]
    return validate_op(frame)
