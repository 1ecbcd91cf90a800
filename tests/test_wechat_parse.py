"""Tests for imserver.wechat: Gewechat callback bodies into plain data (PROTOCOL §10)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imserver.wechat import (
    KINDS,
    Handshake,
    Ignored,
    WeChatMessage,
    dedupe_key,
    kind_for_msg_type,
    parse_callback,
)
from protocol.errors import ErrorCode, OpError

LIMIT = 1 << 20
APPID = "wx_app1"
ME = "wxid_me"
ALICE = "wxid_alice"
ROOM = "123456@chatroom"
BIG_ID = 2**63 - 7  # far beyond 2**53: a float would lose it

SETTINGS = settings(deadline=None, database=None, max_examples=150)
FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)


def add_msg(
    *,
    from_user: str = ALICE,
    to_user: str = ME,
    content: Any = "hello",
    msg_type: Any = 1,
    new_msg_id: Any = 7788254089582231001,
    create_time: Any = 1_700_000_000,
    wxid: Any = ME,
    **data_extra: Any,
) -> dict[str, Any]:
    """A Gewechat AddMsg payload in the capitalised, wrapped-string form."""
    data: dict[str, Any] = {
        "MsgId": 1040356095,
        "FromUserName": {"string": from_user},
        "ToUserName": {"string": to_user},
        "MsgType": msg_type,
        "Content": {"string": content},
        "Status": 3,
        "ImgStatus": 1,
        "ImgBuf": {"iLen": 0},
        "CreateTime": create_time,
        "MsgSource": "<msgsource></msgsource>",
        "PushContent": "Alice : hello",
        "NewMsgId": new_msg_id,
        "MsgSeq": 640356095,
    }
    data.update(data_extra)
    payload: dict[str, Any] = {"TypeName": "AddMsg", "Appid": APPID, "Data": data}
    if wxid is not None:
        payload["Wxid"] = wxid
    return payload


def encode(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def parse(payload: Any, limit: int = LIMIT) -> Any:
    return parse_callback(encode(payload), max_body_bytes=limit)


def parse_msg(payload: Any) -> WeChatMessage:
    result = parse(payload)
    assert isinstance(result, WeChatMessage)
    return result


def invalid(body: bytes, limit: int = LIMIT) -> OpError:
    with pytest.raises(OpError) as info:
        parse_callback(body, max_body_bytes=limit)
    assert info.value.code == ErrorCode.INVALID
    return info.value


# --- AddMsg mapping ----------------------------------------------------------


def test_private_incoming_text() -> None:
    payload = add_msg()
    m = parse_msg(payload)
    assert m.appid == APPID
    assert m.account_wxid == ME
    assert m.peer == ALICE
    assert m.conv == f"wx:{APPID}:{ALICE}"
    assert m.sender == f"wx:{ALICE}"
    assert m.kind == "text"
    assert m.body == "hello"
    assert m.msg_type == 1
    assert m.msg_id == 1040356095
    assert m.new_msg_id == 7788254089582231001
    assert m.ts == 1_700_000_000_000
    assert m.meta == {
        "new_msg_id": "7788254089582231001",
        "msg_type": 1,
        "push_content": "Alice : hello",
    }
    assert m.raw == payload
    assert not m.is_group
    assert not m.outgoing


def test_private_outgoing() -> None:
    m = parse_msg(add_msg(from_user=ME, to_user=ALICE, content="hi back"))
    assert m.peer == ALICE
    assert m.conv == f"wx:{APPID}:{ALICE}"
    assert m.sender == f"wx:{ME}"
    assert m.body == "hi back"
    assert m.outgoing


def test_incoming_and_outgoing_share_the_conversation() -> None:
    incoming = parse_msg(add_msg(from_user=ALICE, to_user=ME))
    outgoing = parse_msg(add_msg(from_user=ME, to_user=ALICE, new_msg_id=2))
    assert incoming.conv == outgoing.conv
    assert incoming.sender != outgoing.sender


def test_group_text_with_sender_prefix() -> None:
    m = parse_msg(add_msg(from_user=ROOM, to_user=ME, content=f"{ALICE}:\nhello group\nline 2"))
    assert m.peer == ROOM
    assert m.conv == f"wx:{APPID}:{ROOM}"
    assert m.sender == f"wx:{ALICE}"
    assert m.body == "hello group\nline 2"
    assert m.is_group


def test_group_message_without_prefix_is_from_the_chatroom() -> None:
    m = parse_msg(add_msg(from_user=ROOM, content='"Alice" joined the group chat', msg_type=10000))
    assert m.sender == f"wx:{ROOM}"
    assert m.body == '"Alice" joined the group chat'
    assert m.kind == "system"


@pytest.mark.parametrize(
    "content",
    [
        "no colon at all",
        "wxid_x: with a space\nafter",  # the colon is not followed by a newline
        "two words:\nbody",  # the prefix is not an id
        ":\nempty prefix",
    ],
)
def test_group_content_that_is_not_a_prefix_stays_whole(content: str) -> None:
    m = parse_msg(add_msg(from_user=ROOM, content=content))
    assert m.sender == f"wx:{ROOM}"
    assert m.body == content


def test_group_message_the_account_sent() -> None:
    m = parse_msg(add_msg(from_user=ME, to_user=ROOM, content="from my phone"))
    assert m.peer == ROOM
    assert m.sender == f"wx:{ME}"
    assert m.body == "from my phone"
    assert m.outgoing


def test_group_message_the_account_sent_with_own_prefix_is_stripped() -> None:
    m = parse_msg(add_msg(from_user=ME, to_user=ROOM, content=f"{ME}:\nmine"))
    assert m.sender == f"wx:{ME}"
    assert m.body == "mine"


def test_group_prefix_naming_the_account_is_outgoing() -> None:
    m = parse_msg(add_msg(from_user=ROOM, content=f"{ME}:\nfrom another device"))
    assert m.sender == f"wx:{ME}"
    assert m.body == "from another device"
    assert m.outgoing


def test_group_image_keeps_the_prefix_rule() -> None:
    xml = '<?xml version="1.0"?>\n<msg><img length="1234" /></msg>'
    m = parse_msg(add_msg(from_user=ROOM, msg_type=3, content=f"{ALICE}:\n{xml}"))
    assert m.kind == "image"
    assert m.sender == f"wx:{ALICE}"
    assert m.body == xml


@pytest.mark.parametrize(
    ("msg_type", "kind"),
    [
        (1, "text"),
        (3, "image"),
        (34, "voice"),
        (43, "video"),
        (47, "emoji"),
        (48, "location"),
        (49, "app"),
        (10000, "system"),
        (10002, "system"),
        (0, "custom"),
        (37, "custom"),  # friend request: no kind of its own
        (51, "custom"),
        (2**32 - 1, "custom"),
    ],
)
def test_kind_from_msg_type(msg_type: int, kind: str) -> None:
    m = parse_msg(add_msg(msg_type=msg_type, content="<msg/>"))
    assert m.kind == kind
    assert m.msg_type == msg_type
    assert m.meta["msg_type"] == msg_type
    assert kind_for_msg_type(msg_type) == kind


def test_kinds_table_matches_the_protocol() -> None:
    assert dict(KINDS) == {
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


def test_app_message_xml_body_is_kept() -> None:
    xml = "<msg><appmsg><title>A link</title><type>5</type></appmsg></msg>"
    m = parse_msg(add_msg(msg_type=49, content=xml))
    assert m.kind == "app"
    assert m.body == xml


def test_lowercase_top_level_keys() -> None:
    payload = add_msg(from_user=ME, to_user=ALICE)
    lower = {
        "type_name": payload["TypeName"],
        "appid": payload["Appid"],
        "data": payload["Data"],
        "wxid": payload["Wxid"],
    }
    m = parse_msg(lower)
    assert m.appid == APPID
    assert m.account_wxid == ME
    assert m.peer == ALICE  # Wxid under its lowercase key decided the direction
    assert m.sender == f"wx:{ME}"
    assert m.raw == lower


def test_capitalised_key_wins_when_both_spellings_are_present() -> None:
    payload = add_msg()
    payload["appid"] = "wx_other"
    assert parse_msg(payload).appid == APPID


def test_bare_string_fields() -> None:
    payload = add_msg()
    data = payload["Data"]
    for name in ("FromUserName", "ToUserName", "Content"):
        data[name] = data[name]["string"]
    m = parse_msg(payload)
    assert m.peer == ALICE
    assert m.body == "hello"


def test_empty_wrapper_and_missing_content_are_empty_bodies() -> None:
    payload = add_msg(msg_type=10002)
    payload["Data"]["Content"] = {}
    assert parse_msg(payload).body == ""
    del payload["Data"]["Content"]
    assert parse_msg(payload).body == ""
    payload["Data"]["Content"] = {"string": None}
    assert parse_msg(payload).body == ""


def test_new_msg_id_beyond_2_53_is_exact() -> None:
    body = encode(add_msg(new_msg_id=BIG_ID))
    assert str(BIG_ID).encode() in body  # sent as a JSON number, not a string
    m = parse_callback(body, max_body_bytes=LIMIT)
    assert isinstance(m, WeChatMessage)
    assert m.new_msg_id == BIG_ID
    assert float(BIG_ID) != BIG_ID  # the value a float-based parser would corrupt
    assert m.meta["new_msg_id"] == "9223372036854775801"


def test_new_msg_id_as_decimal_string() -> None:
    m = parse_msg(add_msg(new_msg_id=str(BIG_ID)))
    assert m.new_msg_id == BIG_ID
    assert m.meta["new_msg_id"] == str(BIG_ID)


def test_integer_fields_accept_decimal_strings() -> None:
    m = parse_msg(add_msg(msg_type="49", create_time="1700000001", MsgId="12"))
    assert (m.msg_type, m.kind, m.ts, m.msg_id) == (49, "app", 1_700_000_001_000, 12)


def test_create_time_becomes_milliseconds() -> None:
    assert parse_msg(add_msg(create_time=1)).ts == 1000
    assert parse_msg(add_msg(create_time=0)).ts == 0
    assert parse_msg(add_msg(create_time=2**32 - 1)).ts == (2**32 - 1) * 1000


def test_msg_id_is_optional_and_lenient() -> None:
    payload = add_msg()
    del payload["Data"]["MsgId"]
    assert parse_msg(payload).msg_id is None
    payload["Data"]["MsgId"] = "not a number"
    assert parse_msg(payload).msg_id is None
    payload["Data"]["MsgId"] = -1
    assert parse_msg(payload).msg_id is None


def test_push_content_in_meta_only_when_present() -> None:
    payload = add_msg()
    payload["Data"]["PushContent"] = {"string": "Alice sent you a photo"}
    assert parse_msg(payload).meta["push_content"] == "Alice sent you a photo"
    for absent in ("", None, 5):
        payload["Data"]["PushContent"] = absent
        assert parse_msg(payload).meta == {
            "new_msg_id": "7788254089582231001",
            "msg_type": 1,
        }


def test_missing_wxid_means_incoming() -> None:
    m = parse_msg(add_msg(from_user=ME, to_user=ALICE, wxid=None))
    assert m.account_wxid is None
    assert m.peer == ME  # no account to compare with: FromUserName is the peer
    assert m.sender == f"wx:{ME}"
    assert not m.outgoing


def test_dedupe_key() -> None:
    a = parse_msg(add_msg(new_msg_id=BIG_ID, content="first"))
    b = parse_msg(add_msg(new_msg_id=str(BIG_ID), content="replayed later"))
    c = parse_msg(add_msg(new_msg_id=BIG_ID - 1))
    assert dedupe_key(a) == (APPID, BIG_ID)
    assert dedupe_key(a) == dedupe_key(b)
    assert dedupe_key(a) != dedupe_key(c)


def test_big_base64_thumbnail_inside_the_limit_is_accepted() -> None:
    thumb = base64.b64encode(bytes(range(256)) * 2000).decode()  # ~680 KB
    payload = add_msg(msg_type=3, content="<msg><img/></msg>")
    payload["Data"]["ImgBuf"] = {"iLen": len(thumb), "buffer": thumb}
    body = encode(payload)
    assert len(body) > 600_000
    m = parse_callback(body, max_body_bytes=len(body))
    assert isinstance(m, WeChatMessage)
    assert m.kind == "image"
    assert m.raw["Data"]["ImgBuf"]["buffer"] == thumb


def test_non_ascii_and_escaped_astral_characters() -> None:
    text = "你好 👋 ok"
    for ensure_ascii in (True, False):
        body = json.dumps(add_msg(content=text), ensure_ascii=ensure_ascii).encode()
        m = parse_callback(body, max_body_bytes=LIMIT)
        assert isinstance(m, WeChatMessage)
        assert m.body == text


# --- other events -------------------------------------------------------------


def test_handshake() -> None:
    result = parse({"testMsg": "回调地址链接成功！", "token": "tok-123"})
    assert result == Handshake(token="tok-123")


@pytest.mark.parametrize("token", [None, 5, ["x"], "x" * 2000, "bad\x00token"])
def test_handshake_with_unusable_token(token: Any) -> None:
    payload: dict[str, Any] = {"testMsg": "hi"}
    if token is not None:
        payload["token"] = token
    assert parse(payload) == Handshake(token=None)


@pytest.mark.parametrize("type_name", ["ModContacts", "DelContacts", "Offline", "FinderMsg"])
def test_other_type_names_are_ignored(type_name: str) -> None:
    payload = {"TypeName": type_name, "Appid": APPID, "Wxid": ME, "Data": {"anything": [1, 2]}}
    assert parse(payload) == Ignored(type_name=type_name, appid=APPID)


def test_ignored_with_lowercase_keys_and_no_appid() -> None:
    assert parse({"type_name": "Offline", "appid": APPID}) == Ignored("Offline", APPID)
    assert parse({"TypeName": "Offline"}) == Ignored("Offline", None)
    assert parse({"TypeName": "Offline", "Data": "not an object"}) == Ignored("Offline", None)


def test_ignored_with_a_bad_appid_is_invalid() -> None:
    err = invalid(encode({"TypeName": "Offline", "Appid": "a:b"}))
    assert err.message.startswith("Appid:")


# --- errors --------------------------------------------------------------------


def _without(path: str) -> dict[str, Any]:
    payload = add_msg()
    if path.startswith("Data."):
        del payload["Data"][path[5:]]
    else:
        del payload[path]
    return payload


@pytest.mark.parametrize(
    "path",
    [
        "Appid",
        "Data",
        "Data.NewMsgId",
        "Data.MsgType",
        "Data.FromUserName",
        "Data.ToUserName",
        "Data.CreateTime",
    ],
)
def test_missing_required_field_is_invalid_and_named(path: str) -> None:
    err = invalid(encode(_without(path)))
    assert err.message == f"{path}: missing"


def test_missing_field_with_lowercase_spelling_names_it_as_sent() -> None:
    payload = {"type_name": "AddMsg", "appid": APPID, "data": {"MsgType": 1}}
    assert invalid(encode(payload)).message == "data.NewMsgId: missing"


def test_null_required_field_is_missing() -> None:
    payload = add_msg()
    payload["Data"]["CreateTime"] = None
    assert invalid(encode(payload)).message == "Data.CreateTime: missing"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("Appid", 5),
        ("Appid", ""),
        ("Appid", "a" * 129),
        ("Appid", "wx:app"),
        ("Appid", "wx app"),
        ("Appid", ["wx_app1"]),
        ("Data", "text"),
        ("Data", [1]),
        ("Wxid", 42),
        ("Wxid", ""),
        ("Wxid", "wxid\nme"),
        ("Data.NewMsgId", True),
        ("Data.NewMsgId", 1.5),
        ("Data.NewMsgId", 1e18),
        ("Data.NewMsgId", 0),
        ("Data.NewMsgId", -5),
        ("Data.NewMsgId", 2**63),
        ("Data.NewMsgId", 2**64 + 1),
        ("Data.NewMsgId", "12a"),
        ("Data.NewMsgId", "-12"),
        ("Data.NewMsgId", " 12"),
        ("Data.NewMsgId", "１２"),  # fullwidth digits are not ASCII
        ("Data.NewMsgId", "9" * 40),
        ("Data.NewMsgId", ""),
        ("Data.NewMsgId", {"string": "12"}),
        ("Data.MsgType", -1),
        ("Data.MsgType", 2**32),
        ("Data.MsgType", "text"),
        ("Data.MsgType", False),
        ("Data.CreateTime", 1.7e9),
        ("Data.CreateTime", -1),
        ("Data.CreateTime", 2**32),
        ("Data.FromUserName", 12),
        ("Data.FromUserName", ""),
        ("Data.FromUserName", {"string": ""}),
        ("Data.FromUserName", {}),
        ("Data.FromUserName", "x" * 129),
        ("Data.FromUserName", "wxid\u202eevil"),
        ("Data.ToUserName", ["a"]),
        ("Data.ToUserName", "has space"),
        ("Data.Content", 5),
        ("Data.Content", ["a"]),
    ],
)
def test_ill_typed_field_is_invalid_and_named(path: str, value: Any) -> None:
    payload = add_msg()
    if path.startswith("Data."):
        payload["Data"][path[5:]] = value
    else:
        payload[path] = value
    err = invalid(encode(payload))
    assert err.message.startswith(f"{path}: ") or err.message.startswith(f"{path}.string: ")
    assert err.message.split(": ", 1)[1] != "missing"


def test_wrapped_string_of_the_wrong_type_names_the_inner_field() -> None:
    payload = add_msg()
    payload["Data"]["FromUserName"] = {"string": 7}
    assert invalid(encode(payload)).message == "Data.FromUserName.string: must be a string"


def test_id_length_limits() -> None:
    at_limit = "a" * 128
    m = parse_msg({**add_msg(from_user=at_limit), "Appid": at_limit})
    assert (m.appid, m.peer) == (at_limit, at_limit)


def test_missing_type_name_is_invalid() -> None:
    payload = add_msg()
    del payload["TypeName"]
    assert invalid(encode(payload)).message == "TypeName: missing"


@pytest.mark.parametrize("type_name", [5, "", "x" * 65, "Add\nMsg", ["AddMsg"]])
def test_bad_type_name_is_invalid(type_name: Any) -> None:
    payload = add_msg()
    payload["TypeName"] = type_name
    assert invalid(encode(payload)).message.startswith("TypeName: ")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b'{"TypeName": "AddMsg",}',
        b"\xff\xfe{}",
        '{"a": "é"}'.encode("latin-1"),
        '{"TypeName": "Offline"}'.encode("utf-16"),
        b'\xef\xbb\xbf{"TypeName": "Offline"}',  # UTF-8 BOM
        b'{"TypeName": "Offline", "x": NaN}',
        b'{"TypeName": "Offline", "x": Infinity}',
        b'{"TypeName": "Offline", "x": -Infinity}',
        b'{"TypeName": "Offline", "x": 1e400}',
        b'{"TypeName": "Offline", "x": ' + b"1" * 5000 + b"}",
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
)
def test_not_json_is_invalid(body: bytes) -> None:
    assert invalid(body).message.startswith("body: not ")


@pytest.mark.parametrize("value", [[], [1, 2], "AddMsg", 5, 1.5, None, True])
def test_not_an_object_is_invalid(value: Any) -> None:
    assert invalid(encode(value)).message == "body: not a JSON object"


@pytest.mark.parametrize(
    "content", ["nul \x00 inside", "lone \ud800 surrogate", "low \udc00 alone"]
)
def test_unstorable_strings_are_invalid(content: str) -> None:
    body = json.dumps(add_msg(content=content)).encode()  # \u escapes, valid JSON
    assert invalid(body).message.startswith("body: ")


def test_unstorable_string_deep_in_raw_or_in_a_key_is_invalid() -> None:
    payload = add_msg()
    payload["Data"]["Extra"] = {"list": [1, {"k": "x\x00"}]}
    assert invalid(encode(payload)).message.startswith("body: ")
    payload = add_msg()
    payload["Data"]["bad\ud801key"] = 1
    assert invalid(encode(payload)).message.startswith("body: ")


def test_oversize_is_too_large_before_parsing() -> None:
    body = encode(add_msg())
    assert isinstance(parse_callback(body, max_body_bytes=len(body)), WeChatMessage)
    with pytest.raises(OpError) as info:
        parse_callback(body, max_body_bytes=len(body) - 1)
    assert info.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(OpError) as info:
        parse_callback(b"x" * 101, max_body_bytes=100)  # not JSON, but too large first
    assert info.value.code == ErrorCode.TOO_LARGE
    assert "101" in info.value.message


# --- property tests ---------------------------------------------------------------

json_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates too
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["TypeName", "Appid", "Data", "Wxid", "string", "testMsg"])
            | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=15,
)


def _outcome(body: bytes, limit: int) -> Handshake | Ignored | WeChatMessage | OpError:
    """What parsing gives: the result, or the OpError (any other exception escapes)."""
    try:
        return parse_callback(body, max_body_bytes=limit)
    except OpError as e:
        return e


def _parse_or_op_error(body: bytes) -> None:
    result = _outcome(body, 4096)
    if isinstance(result, OpError):
        assert result.code in (ErrorCode.INVALID, ErrorCode.TOO_LARGE)
        assert result.message
    else:
        assert isinstance(result, Handshake | Ignored | WeChatMessage)


@FUZZ
@given(json_values)
def test_arbitrary_json_raises_only_op_error(value: Any) -> None:
    _parse_or_op_error(json.dumps(value).encode())


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_op_error(body: bytes) -> None:
    _parse_or_op_error(body)


_DATA_FIELDS = [
    "NewMsgId",
    "MsgId",
    "MsgType",
    "FromUserName",
    "ToUserName",
    "Content",
    "CreateTime",
    "PushContent",
]


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["TypeName", "Appid", "Data", "Wxid", "type_name", "appid", "data"])
            | st.sampled_from([f"Data.{f}" for f in _DATA_FIELDS]),
            st.none() | json_values | st.just({"string": 1}) | st.just({"string": "x"}),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_mutated_add_msg_raises_only_op_error(
    mutations: list[tuple[str, Any]], delete: bool
) -> None:
    payload = add_msg(from_user=ROOM, content=f"{ALICE}:\nhi")
    for path, value in mutations:
        target = payload
        key = path
        if path.startswith("Data."):
            if not isinstance(payload.get("Data"), dict):
                continue
            target, key = payload["Data"], path[5:]
        if delete and value is None:
            target.pop(key, None)
        else:
            target[key] = copy.deepcopy(value)
    result = _outcome(encode(payload), LIMIT)
    if isinstance(result, OpError):
        assert result.code == ErrorCode.INVALID
        assert ": " in result.message
    else:
        assert isinstance(result, Handshake | Ignored | WeChatMessage)


_ID_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
ids = st.text(_ID_CHARS, min_size=1, max_size=40)
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=60)


@SETTINGS
@given(
    appid=ids,
    account=ids,
    other=ids,
    sender=ids,
    text=texts,
    group=st.booleans(),
    outgoing=st.booleans(),
    lowercase=st.booleans(),
    wrapped=st.booleans(),
    id_as_string=st.booleans(),
    ensure_ascii=st.booleans(),
    new_msg_id=st.integers(1, 2**63 - 1),
    msg_type=st.integers(0, 2**32 - 1) | st.sampled_from(sorted(KINDS)),
    create_time=st.integers(0, 2**32 - 1),
)
def test_valid_add_msg_round_trips(
    appid: str,
    account: str,
    other: str,
    sender: str,
    text: str,
    group: bool,
    outgoing: bool,
    lowercase: bool,
    wrapped: bool,
    id_as_string: bool,
    ensure_ascii: bool,
    new_msg_id: int,
    msg_type: int,
    create_time: int,
) -> None:
    assume(other != account)
    peer = f"{other}{'@chatroom' if group else ''}"
    if outgoing:
        from_user, to_user, content = account, peer, text
        assume(not text.startswith(f"{account}:\n"))
        want_sender = account
    elif group:
        from_user, to_user, content = peer, account, f"{sender}:\n{text}"
        want_sender = sender
    else:
        from_user, to_user, content = peer, account, text
        want_sender = peer

    def wrap(s: str) -> Any:
        return {"string": s} if wrapped else s

    data = {
        "NewMsgId": str(new_msg_id) if id_as_string else new_msg_id,
        "MsgType": msg_type,
        "FromUserName": wrap(from_user),
        "ToUserName": wrap(to_user),
        "Content": wrap(content),
        "CreateTime": create_time,
    }
    keys = (
        ("type_name", "appid", "data", "wxid")
        if lowercase
        else ("TypeName", "Appid", "Data", "Wxid")
    )
    payload = dict(zip(keys, ("AddMsg", appid, data, account), strict=True))
    body = json.dumps(payload, ensure_ascii=ensure_ascii).encode()

    m = parse_callback(body, max_body_bytes=len(body))
    assert isinstance(m, WeChatMessage)
    assert m.appid == appid
    assert m.account_wxid == account
    assert m.new_msg_id == new_msg_id
    assert m.msg_id is None
    assert m.msg_type == msg_type
    assert m.peer == peer
    assert m.conv == f"wx:{appid}:{peer}"
    assert m.sender == f"wx:{want_sender}"
    assert m.kind == KINDS.get(msg_type, "custom")
    assert m.body == text
    assert m.ts == create_time * 1000
    assert m.meta == {"new_msg_id": str(new_msg_id), "msg_type": msg_type}
    assert m.raw == payload
    assert m.is_group == group
    assert m.outgoing == (outgoing or (group and sender == account))
    assert dedupe_key(m) == (appid, new_msg_id)
