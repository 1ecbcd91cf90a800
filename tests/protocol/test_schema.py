"""Tests for protocol.schema: one schema per client operation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, OpError
from protocol.schema import (
    _VALIDATORS,
    CLIENT_OPS,
    MAX_ID,
    MAX_META_DEPTH,
    OPS,
    FieldSpec,
    FieldType,
    OpSchema,
    _compile,
    _compile_send,
    is_user_name,
    safe_rid,
    validate,
)

from .strategies import client_like_frames, json_values

# The client operations of PROTOCOL.md sections 3 and 5-8.
EXPECTED_OPS = {
    "auth", "login", "register", "logout", "ping",
    "send", "sync", "history", "read", "recv", "recall", "delete", "conv_set", "typing",
    "friend_request", "friend_accept", "friend_reject", "friend_remove", "block", "unblock",
    "friends", "friend_requests", "presence", "presence_query",
    "group_create", "group_info", "group_update", "group_dissolve", "group_add",
    "group_remove", "group_leave", "group_role", "groups", "notices", "notice_read",
}  # fmt: skip

# One valid frame per operation, with every field set.
VALID: dict[str, dict[str, Any]] = {
    "auth": {"op": "auth", "rid": 1, "token": "t0k3n", "device": "phone"},
    "login": {"op": "login", "rid": 1, "user": "alice", "password": "pw", "device": "web"},
    "register": {"op": "register", "rid": 1, "user": "a.b-c_d", "password": "pw", "device": "x"},
    "logout": {"op": "logout", "rid": 7},
    "ping": {"op": "ping", "rid": 0},
    "send": {
        "op": "send",
        "rid": MAX_ID,
        "to": "bob",
        "cid": "c1",
        "kind": "image",
        "body": "hi",
        "meta": {"url": "http://x/y.png", "size": 10, "width": 1.5, "tags": ["a"], "x": None},
        "mentions": ["carol"],
        "reply_to": 5,
    },
    "sync": {"op": "sync", "rid": 1},
    "history": {"op": "history", "rid": 1, "conv": "d:alice:bob", "after_seq": 0, "limit": 200},
    "read": {"op": "read", "rid": 1, "conv": "g:1", "seq": 3},
    "recv": {"op": "recv", "conv": "g:1", "seq": 0},
    "recall": {"op": "recall", "rid": 1, "mid": 1},
    "delete": {"op": "delete", "rid": 1, "mid": MAX_ID},
    "conv_set": {"op": "conv_set", "rid": 1, "conv": "g:1", "pinned": True, "muted": False},
    "typing": {"op": "typing", "group": "g1", "on": True},
    "friend_request": {"op": "friend_request", "rid": 1, "to": "bob", "note": "hi"},
    "friend_accept": {"op": "friend_accept", "rid": 1, "user": "bob"},
    "friend_reject": {"op": "friend_reject", "rid": 1, "user": "bob"},
    "friend_remove": {"op": "friend_remove", "rid": 1, "user": "bob"},
    "block": {"op": "block", "rid": 1, "user": "bob"},
    "unblock": {"op": "unblock", "rid": 1, "user": "bob"},
    "friends": {"op": "friends", "rid": 1},
    "friend_requests": {"op": "friend_requests", "rid": 1},
    "presence": {"op": "presence", "rid": 1, "status": "away"},
    "presence_query": {"op": "presence_query", "rid": 1, "users": ["bob", "carol"]},
    "group_create": {"op": "group_create", "rid": 1, "name": "Team", "members": ["bob"]},
    "group_info": {"op": "group_info", "rid": 1, "group": "g1"},
    "group_update": {"op": "group_update", "rid": 1, "group": "g1", "name": "N", "avatar": ""},
    "group_dissolve": {"op": "group_dissolve", "rid": 1, "group": "g1"},
    "group_add": {"op": "group_add", "rid": 1, "group": "g1", "users": ["bob"]},
    "group_remove": {"op": "group_remove", "rid": 1, "group": "g1", "users": ["bob", "eve"]},
    "group_leave": {"op": "group_leave", "rid": 1, "group": "g1"},
    "group_role": {"op": "group_role", "rid": 1, "group": "g1", "user": "bob", "role": "admin"},
    "groups": {"op": "groups", "rid": 1},
    "notices": {"op": "notices", "rid": 1},
    "notice_read": {"op": "notice_read", "rid": 1, "id": 9},
}


def check_invalid(frame: dict[str, Any], field: str | None = None) -> OpError:
    with pytest.raises(OpError) as info:
        validate(frame)
    assert info.value.code is ErrorCode.INVALID, info.value
    if field is not None:
        assert info.value.message.startswith(f"{field}"), info.value.message
    return info.value


# ---------------------------------------------------------------- the table


def test_client_ops_are_the_protocols() -> None:
    assert set(CLIENT_OPS) == EXPECTED_OPS
    assert set(OPS) == EXPECTED_OPS
    assert set(VALID) == EXPECTED_OPS


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS))
def test_every_op_has_a_schema(op: str) -> None:
    schema = OPS[op]
    assert schema.name == op
    assert "rid" in schema.fields
    for name in schema.exactly_one + schema.at_least_one + schema.at_most_one:
        assert name in schema.fields
        assert not schema.fields[name].required


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS))
def test_valid_frames_pass_unchanged(op: str) -> None:
    frame = copy.deepcopy(VALID[op])
    assert validate(frame) is frame
    assert frame == VALID[op]


# ---------------------------------------------------------------- generated invalid cases


_WRONG_VALUES: dict[FieldType, list[Any]] = {
    FieldType.STR: [1, True, 1.5, [], {}],
    FieldType.USER: [1, True, "", "a b", "a" * 65, "ü", "a\n", "wx:abc", ["bob"]],
    FieldType.INT: ["1", True, False, 1.0, [], {}],
    FieldType.BOOL: [1, 0, "true", [], {}],
    FieldType.USER_LIST: ["bob", [1], ["bad name"], [None], {"a": 1}, [["bob"]]],
    FieldType.MAP: ["x", [], 1, True],
}


def _invalid_cases() -> list[tuple[str, str, Any]]:
    cases: list[tuple[str, str, Any]] = []
    for op, schema in sorted(OPS.items()):
        for name, spec in schema.fields.items():
            cases.extend((op, name, value) for value in _WRONG_VALUES[spec.type])
            if spec.type is FieldType.INT:
                if spec.min is not None:
                    cases.append((op, name, spec.min - 1))
                if spec.max is not None:
                    cases.append((op, name, spec.max + 1))
            if spec.type is FieldType.STR:
                if spec.max_len is not None and spec.choices is None:
                    cases.append((op, name, "x" * (spec.max_len + 1)))
                if spec.min_len > 0:
                    cases.append((op, name, ""))
                if spec.choices is not None:
                    cases.append((op, name, "nope"))
                    cases.append((op, name, sorted(spec.choices)[0].upper()))
            if spec.type is FieldType.USER_LIST:
                if spec.max_len is not None:
                    cases.append((op, name, ["bob"] * (spec.max_len + 1)))
                if spec.min_len > 0:
                    cases.append((op, name, []))
    return cases


@pytest.mark.parametrize(("op", "field", "value"), _invalid_cases())
def test_wrong_type_or_range_is_invalid(op: str, field: str, value: Any) -> None:
    frame = copy.deepcopy(VALID[op])
    frame[field] = value
    check_invalid(frame, field)


def _required_cases() -> list[tuple[str, str]]:
    return [
        (op, name)
        for op, schema in sorted(OPS.items())
        for name, spec in schema.fields.items()
        if spec.required
    ]


@pytest.mark.parametrize(("op", "field"), _required_cases())
def test_missing_required_field_is_invalid(op: str, field: str) -> None:
    frame = copy.deepcopy(VALID[op])
    del frame[field]
    assert check_invalid(frame, field).message == f"{field}: required"
    frame[field] = None
    assert check_invalid(frame, field).message == f"{field}: required"


# ---------------------------------------------------------------- hand-written cases


INVALID_TABLE: list[tuple[str, dict[str, Any], str]] = [
    # (name, frame, field the message names)
    ("send none of to/group/conv", {"op": "send", "cid": "c"}, "to, group, conv"),
    ("send to and group", {"op": "send", "cid": "c", "to": "bob", "group": "g"}, "to, group, conv"),
    (
        "send all three",
        {"op": "send", "cid": "c", "to": "b", "group": "g", "conv": "c"},
        "to, group, conv",
    ),
    ("send to and conv", {"op": "send", "cid": "c", "to": "b", "conv": "d:a:b"}, "to, group, conv"),
    ("send no cid", {"op": "send", "to": "bob"}, "cid"),
    ("send cid too long", {"op": "send", "to": "bob", "cid": "c" * 65}, "cid"),
    ("send kind system", {"op": "send", "to": "bob", "cid": "c", "kind": "system"}, "kind"),
    ("send kind recall", {"op": "send", "to": "bob", "cid": "c", "kind": "recall"}, "kind"),
    ("send body int", {"op": "send", "to": "bob", "cid": "c", "body": 5}, "body"),
    (
        "send body too long",
        {"op": "send", "to": "b", "cid": "c", "body": "x" * (2**20 + 1)},
        "body",
    ),
    ("send reply_to 0", {"op": "send", "to": "bob", "cid": "c", "reply_to": 0}, "reply_to"),
    ("send reply_to 2^53", {"op": "send", "to": "b", "cid": "c", "reply_to": 2**53}, "reply_to"),
    ("send meta list", {"op": "send", "to": "bob", "cid": "c", "meta": [1]}, "meta"),
    ("send meta nan", {"op": "send", "to": "b", "cid": "c", "meta": {"a": math.nan}}, "meta"),
    ("send meta bytes", {"op": "send", "to": "b", "cid": "c", "meta": {"a": [b"x"]}}, "meta"),
    ("send meta int key", {"op": "send", "to": "b", "cid": "c", "meta": {"a": {1: 2}}}, "meta"),
    (
        "send mentions 501",
        {"op": "send", "group": "g", "cid": "c", "mentions": ["a"] * 501},
        "mentions",
    ),
    (
        "send bad mention",
        {"op": "send", "group": "g", "cid": "c", "mentions": ["a", "b c"]},
        "mentions[1]",
    ),
    ("rid bool", {"op": "ping", "rid": True}, "rid"),
    ("rid negative", {"op": "ping", "rid": -1}, "rid"),
    ("rid 2^53", {"op": "ping", "rid": 2**53}, "rid"),
    ("rid str", {"op": "ping", "rid": "1"}, "rid"),
    ("rid float", {"op": "ping", "rid": 1.0}, "rid"),
    ("history limit 0", {"op": "history", "conv": "c", "limit": 0}, "limit"),
    ("history limit 201", {"op": "history", "conv": "c", "limit": 201}, "limit"),
    ("history limit bool", {"op": "history", "conv": "c", "limit": True}, "limit"),
    (
        "history after and before",
        {"op": "history", "conv": "c", "after_seq": 1, "before_seq": 5},
        "after_seq, before_seq",
    ),
    ("history no conv", {"op": "history", "limit": 5}, "conv"),
    ("history conv too long", {"op": "history", "conv": "c" * 301}, "conv"),
    ("history negative seq", {"op": "history", "conv": "c", "before_seq": -1}, "before_seq"),
    ("read no seq", {"op": "read", "conv": "c"}, "seq"),
    ("recv seq bool", {"op": "recv", "conv": "c", "seq": False}, "seq"),
    ("recall mid 0", {"op": "recall", "mid": 0}, "mid"),
    ("delete mid str", {"op": "delete", "mid": "5"}, "mid"),
    ("conv_set neither", {"op": "conv_set", "conv": "c"}, "pinned, muted"),
    (
        "conv_set both null",
        {"op": "conv_set", "conv": "c", "pinned": None, "muted": None},
        "pinned, muted",
    ),
    ("conv_set int", {"op": "conv_set", "conv": "c", "pinned": 1}, "pinned"),
    ("typing neither", {"op": "typing", "on": True}, "to, group"),
    ("typing both", {"op": "typing", "to": "bob", "group": "g", "on": True}, "to, group"),
    ("typing on int", {"op": "typing", "to": "bob", "on": 1}, "on"),
    ("typing no on", {"op": "typing", "to": "bob"}, "on"),
    (
        "friend_request note too long",
        {"op": "friend_request", "to": "b", "note": "n" * 257},
        "note",
    ),
    ("presence offline", {"op": "presence", "status": "offline"}, "status"),
    ("presence_query 501", {"op": "presence_query", "users": ["a"] * 501}, "users"),
    ("group_create no name", {"op": "group_create", "members": []}, "name"),
    ("group_create 1001", {"op": "group_create", "name": "n", "members": ["a"] * 1001}, "members"),
    ("group_add empty", {"op": "group_add", "group": "g", "users": []}, "users"),
    ("group_role bad role", {"op": "group_role", "group": "g", "user": "b", "role": "god"}, "role"),
    ("group_update name empty", {"op": "group_update", "group": "g", "name": ""}, "name"),
    (
        "group_update avatar long",
        {"op": "group_update", "group": "g", "avatar": "a" * 1025},
        "avatar",
    ),
    ("notice_read id 0", {"op": "notice_read", "id": 0}, "id"),
    ("login password too long", {"op": "login", "user": "a", "password": "p" * 1025}, "password"),
    ("login empty password", {"op": "login", "user": "a", "password": ""}, "password"),
    ("auth token too long", {"op": "auth", "token": "t" * 257}, "token"),
    ("auth device empty", {"op": "auth", "token": "t", "device": ""}, "device"),
    ("register bad user", {"op": "register", "user": "wx:abc", "password": "p"}, "user"),
    ("op not a string", {"op": 5}, "op"),
    # U+0000 cannot be stored by PostgreSQL: refused in every string and in meta.
    ("send body NUL", {"op": "send", "to": "bob", "cid": "c", "body": "a\x00"}, "body"),
    ("send cid NUL", {"op": "send", "to": "bob", "cid": "c\x00"}, "cid"),
    ("send conv NUL", {"op": "send", "conv": "d:a:b\x00", "cid": "c"}, "conv"),
    ("send meta key NUL", {"op": "send", "to": "b", "cid": "c", "meta": {"k\x00": 1}}, "meta"),
    (
        "send meta nested NUL",
        {"op": "send", "to": "b", "cid": "c", "meta": {"k": [{"x": "\x00"}]}},
        "meta",
    ),
    ("group_create name NUL", {"op": "group_create", "name": "\x00", "members": []}, "name"),
    ("friend_request note NUL", {"op": "friend_request", "to": "b", "note": "\x00"}, "note"),
]


@pytest.mark.parametrize(
    ("frame", "field"), [(f, n) for _, f, n in INVALID_TABLE], ids=[i for i, _, _ in INVALID_TABLE]
)
def test_invalid_table(frame: dict[str, Any], field: str) -> None:
    error = check_invalid(frame, field)
    assert error.message.startswith(f"{field}: "), error.message
    assert error.to_frame(safe_rid(frame))["code"] == "invalid"


def test_meta_depth_is_bounded() -> None:
    meta: dict[str, Any] = {}
    node = meta
    for _ in range(MAX_META_DEPTH - 1):
        node["a"] = {}
        node = node["a"]
    frame = {"op": "send", "to": "bob", "cid": "c", "meta": meta}
    validate(frame)
    node["a"] = [1]
    check_invalid(frame, "meta")


@pytest.mark.parametrize("op", ["nope", "", "SEND", "msg", "ok", "error", "x" * 1000])
def test_unknown_op(op: str) -> None:
    with pytest.raises(OpError) as info:
        validate({"op": op, "rid": 1})
    assert info.value.code is ErrorCode.UNKNOWN_OP
    assert len(info.value.message) < 100


# ---------------------------------------------------------------- defaults and nulls


def test_defaults_are_filled_in() -> None:
    assert validate({"op": "send", "to": "bob", "cid": "c"}) == {
        "op": "send",
        "to": "bob",
        "cid": "c",
        "kind": "text",
        "body": "",
    }
    assert validate({"op": "history", "conv": "c"})["limit"] == 50
    assert validate({"op": "auth", "token": "t"})["device"] == "default"
    assert validate({"op": "login", "user": "u", "password": "p"})["device"] == "default"
    assert validate({"op": "friend_request", "to": "bob"})["note"] == ""


def test_nulls_count_as_absent() -> None:
    frame = validate(
        {
            "op": "send",
            "rid": None,
            "to": "bob",
            "group": None,
            "cid": "c",
            "kind": None,
            "meta": None,
            "mentions": None,
            "reply_to": None,
        }
    )
    assert frame == {"op": "send", "to": "bob", "cid": "c", "kind": "text", "body": ""}


def test_unknown_fields_are_ignored() -> None:
    frame = {"op": "ping", "rid": 1, "future": {"x": [1, 2]}, "v": 2}
    assert validate(dict(frame)) == frame


def test_edge_values_are_valid() -> None:
    validate({"op": "history", "conv": "c", "limit": 1, "before_seq": MAX_ID})
    validate({"op": "history", "conv": "c", "limit": 200, "after_seq": 0})
    validate({"op": "send", "conv": "c" * 300, "cid": "c" * 64, "body": "x" * 2**20})
    validate({"op": "send", "group": "g" * 64, "cid": "c", "mentions": ["a"] * 500})
    validate({"op": "presence_query", "users": []})
    validate({"op": "presence_query", "users": ["u" * 64] * 500})
    validate({"op": "group_create", "name": "n" * 128, "members": ["a"] * 1000})
    validate({"op": "group_add", "group": "g", "users": ["a"] * 1000})
    validate({"op": "conv_set", "conv": "c", "muted": False})
    validate({"op": "ping", "rid": 0})
    validate({"op": "ping", "rid": MAX_ID})


def test_user_names() -> None:
    assert is_user_name("a")
    assert is_user_name("A.b-c_9" * 9 + "x")
    assert not is_user_name("a" * 65)
    assert not is_user_name("")
    assert not is_user_name("bob\n")
    assert not is_user_name("wx:bob")
    assert not is_user_name(5)


def test_safe_rid() -> None:
    assert safe_rid({"rid": 5}) == 5
    assert safe_rid({"rid": True}) is None
    assert safe_rid({"rid": -1}) is None
    assert safe_rid({"rid": 2**53}) is None
    assert safe_rid({}) is None


# ---------------------------------------------------------------- property


@settings(deadline=None, database=None, max_examples=80)
@given(client_like_frames)
def test_validate_returns_or_raises_op_error(frame: dict[str, Any]) -> None:
    error: OpError | None = None
    try:
        result = validate(frame)
    except OpError as exc:
        error = exc
    if error is not None:
        assert error.code in (ErrorCode.INVALID, ErrorCode.UNKNOWN_OP)
        assert error.message
        return
    assert result is frame
    schema = OPS[frame["op"]]
    for name, spec in schema.fields.items():
        if spec.required or spec.default is not None:
            assert frame.get(name) is not None, name
    # Validating again changes nothing.
    assert validate(copy.deepcopy(frame)) == frame


_send_frames = st.fixed_dictionaries(
    {"op": st.just("send")},
    optional={
        "rid": st.none() | st.integers(-1, 2**53) | st.booleans(),
        "to": st.none() | st.sampled_from(["bob", "b b", "", "a" * 65]) | st.integers(),
        "group": st.none() | st.text(max_size=3) | st.just("g" * 65) | st.booleans(),
        "conv": st.none() | st.text(max_size=3) | st.just("c" * 301) | st.floats(),
        "cid": st.none() | st.text(max_size=3) | st.just("c" * 65) | st.integers(),
        "kind": st.none() | st.sampled_from(["text", "file", "system", ""]) | st.lists(st.none()),
        "body": st.none() | st.text(max_size=3) | st.integers(),
        "meta": st.none() | json_values,
        "mentions": st.none() | st.lists(st.sampled_from(["a", "b c"]), max_size=3) | st.text(),
        "reply_to": st.none() | st.integers(-1, 2**53) | st.booleans(),
    },
)


def _outcome(validator: Callable[[dict[str, Any]], dict[str, Any]], frame: dict[str, Any]) -> Any:
    frame = copy.deepcopy(frame)
    try:
        return validator(frame)
    except OpError as exc:
        return (exc.code, exc.message)


@settings(deadline=None, database=None, max_examples=100)
@given(_send_frames)
def test_send_fast_path_agrees_with_the_generic_validator(frame: dict[str, Any]) -> None:
    frame.pop("rid", None)  # checked by validate() itself, before either
    assert _outcome(_VALIDATORS["send"], frame) == _outcome(_compile(OPS["send"]), frame)


def test_the_table_is_data() -> None:
    # A schema outside the table compiles too, with open-ended bounds.
    schema = OpSchema(
        name="custom",
        fields={
            "n": FieldSpec(FieldType.INT, min=0),
            "m": FieldSpec(FieldType.INT, max=0),
            "s": FieldSpec(FieldType.STR, min_len=2),
            "u": FieldSpec(FieldType.USER_LIST),
            "d": FieldSpec(FieldType.MAP),
        },
    )
    check = _compile(schema)
    assert check({"n": 10**30, "m": -(10**30), "s": "x" * 10**5, "u": ["a"] * 10**4})
    assert check({"d": {"a": [[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]}})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": -1}, "n: must be at least 0"),
        ({"m": 1}, "m: must be at most 0"),
        ({"s": "x"}, "s: must be at least 2 characters"),
    ]
    for frame, message in cases:
        with pytest.raises(OpError, match=message):
            check(frame)


def test_send_fast_path_guards_its_assumptions() -> None:
    send = OPS["send"]
    with pytest.raises(RuntimeError):
        _compile_send(OpSchema("send", send.fields, exactly_one=("to", "group")))
    fields = dict(send.fields)
    fields["cid"] = FieldSpec(FieldType.STR, required=True)
    with pytest.raises(RuntimeError):
        _compile_send(OpSchema("send", fields, exactly_one=send.exactly_one))
    fields = dict(send.fields)
    fields["meta"] = FieldSpec(FieldType.MAP, required=True)
    with pytest.raises(RuntimeError):
        _compile_send(OpSchema("send", fields, exactly_one=send.exactly_one))
