"""Tests for protocol.codec: TCP framing, WebSocket messages, limits, fuzzing."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from types import MappingProxyType
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    NEED_DATA,
    FrameDecoder,
    decode_ws,
    encode_frame,
    encode_ws,
    frame_prefix,
    pack,
    to_json,
    unpack_map,
)
from protocol.errors import ErrorCode, FrameError, LocalProtocolError

from .strategies import frames, json_values

SETTINGS = settings(deadline=None, database=None, max_examples=100)
FEW = settings(deadline=None, database=None, max_examples=40)
FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)

FRAME_A: dict[str, Any] = {"op": "send", "rid": 1, "to": "bob", "cid": "c1", "body": "hi 你好"}
FRAME_B: dict[str, Any] = {"op": "ping", "rid": 2}
FRAME_C: dict[str, Any] = {
    "op": "msg",
    "meta": {"url": "http://x", "size": 12, "w": 1.5},
    "mentions": ["a", "b"],
}


def framed(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def drain(decoder: FrameDecoder, limit: int = 100_000) -> list[dict[str, Any]]:
    """Take frames until NEED_DATA, with a bound on iterations (no hangs)."""
    out: list[dict[str, Any]] = []
    for _ in range(limit):
        frame = decoder.next_frame()
        if frame is NEED_DATA:
            return out
        out.append(frame)
    raise AssertionError("decoder did not return NEED_DATA")


def decode_all(data: bytes, max_frame_bytes: int = 65536) -> list[dict[str, Any]]:
    decoder = FrameDecoder(max_frame_bytes)
    decoder.receive_data(data)
    out = drain(decoder)
    decoder.receive_data(b"")
    assert drain(decoder) == []
    return out


# ---------------------------------------------------------------- round trips


@SETTINGS
@given(frames)
def test_round_trip(frame: dict[str, Any]) -> None:
    # TCP framing.
    assert decode_all(encode_frame(frame)) == [frame]
    # WebSocket, binary.
    binary = encode_ws(frame, text=False)
    assert isinstance(binary, bytes)
    assert decode_ws(binary) == [frame]
    # WebSocket, text.
    text = encode_ws(frame, text=True)
    assert isinstance(text, str)
    assert text == to_json(frame)
    assert decode_ws(text) == [frame]


@FEW
@given(st.lists(frames, min_size=1, max_size=4))
def test_round_trip_ws_several_maps(batch: list[dict[str, Any]]) -> None:
    message = b"".join(pack(frame) for frame in batch)
    assert decode_ws(message) == batch


@FEW
@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_any_split_decodes_like_whole(batch: list[dict[str, Any]], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(frame) for frame in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = FrameDecoder()
    out: list[dict[str, Any]] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        if cut > start:
            decoder.receive_data(wire[start:cut])
            out.extend(drain(decoder))
            start = cut
    decoder.receive_data(b"")
    out.extend(drain(decoder))
    assert out == batch


def test_every_split_point_and_byte_by_byte() -> None:
    batch = [FRAME_A, FRAME_B, FRAME_C]
    wire = b"".join(encode_frame(frame) for frame in batch)
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder()
        if cut:
            decoder.receive_data(wire[:cut])
        out = drain(decoder)
        decoder.receive_data(wire[cut:])
        out.extend(drain(decoder))
        assert out == batch, cut
    decoder = FrameDecoder()
    out = []
    for i in range(len(wire)):
        decoder.receive_data(wire[i : i + 1])
        out.extend(drain(decoder))
    assert out == batch
    assert decoder.buffered == 0


def test_trailing_data_is_kept_for_the_next_frame() -> None:
    wire_a, wire_b = encode_frame(FRAME_A), encode_frame(FRAME_B)
    decoder = FrameDecoder()
    decoder.receive_data(wire_a + wire_b[:3])
    assert decoder.next_frame() == FRAME_A
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered == 3
    decoder.receive_data(wire_b[3:-1])
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(wire_b[-1:] + wire_a)
    assert decoder.frames() == [FRAME_B, FRAME_A]
    assert decoder.frames() == []


def test_many_small_frames_in_one_chunk() -> None:
    batch = [{"op": "ping", "rid": i} for i in range(5000)]
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(frame) for frame in batch))
    assert decoder.frames() == batch
    assert decoder.buffered == 0


def test_waiting_decoder_keeps_only_the_partial_frame() -> None:
    batch = [{"op": "send", "body": "x" * 1000, "rid": i} for i in range(1000)]
    wire = b"".join(encode_frame(frame) for frame in batch)
    decoder = FrameDecoder()
    decoder.receive_data(wire[:-10])
    assert decoder.frames() == batch[:-1]
    assert decoder.buffered < 1100
    assert sys.getsizeof(decoder._buffer) < 2000
    decoder.receive_data(wire[-10:])
    assert decoder.frames() == batch[-1:]


def test_idle_decoder_releases_its_buffer() -> None:
    big = {"op": "send", "body": "x" * 60000}
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(big))
    assert decoder.next_frame() == big
    assert decoder.buffered == 0
    assert sys.getsizeof(decoder._buffer) < 200


def test_encode_frame_layout() -> None:
    payload = pack(FRAME_B)
    assert encode_frame(FRAME_B) == len(payload).to_bytes(4, "big") + payload
    assert frame_prefix(payload) == len(payload).to_bytes(4, "big")
    assert msgpack.unpackb(payload) == FRAME_B


def test_pack_accepts_any_mapping() -> None:
    assert unpack_map(pack(MappingProxyType(FRAME_A))) == FRAME_A
    assert json.loads(to_json(MappingProxyType(FRAME_A))) == FRAME_A


def test_to_json_is_compact_utf8() -> None:
    assert to_json({"op": "x", "b": "你好", "n": [1, 2]}) == '{"op":"x","b":"你好","n":[1,2]}'


# ---------------------------------------------------------------- TCP errors


def test_zero_length_is_refused() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(FrameError, match="zero"):
        decoder.next_frame()


def test_oversize_length_is_refused_as_soon_as_the_prefix_arrives() -> None:
    decoder = FrameDecoder(max_frame_bytes=100)
    decoder.receive_data(struct.pack(">I", 101)[:3])
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(struct.pack(">I", 101)[3:])
    with pytest.raises(FrameError, match="max_frame_bytes") as info:
        decoder.next_frame()
    assert info.value.code is ErrorCode.BAD_FRAME
    assert info.value.close is True
    assert info.value.ws_close == 1002
    # Errors are sticky.
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_length_at_the_limit_is_accepted() -> None:
    frame = {"op": "x", "b": "y" * 40}
    while len(pack(frame)) < 100:
        frame["b"] += "y"
    assert len(pack(frame)) == 100
    assert decode_all(encode_frame(frame), max_frame_bytes=100) == [frame]
    with pytest.raises(FrameError):
        decode_all(encode_frame(frame), max_frame_bytes=99)


def test_default_limit_is_64k() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack(">I", 65537))
    with pytest.raises(FrameError):
        decoder.next_frame()


@pytest.mark.parametrize("partial", [b"\x00", b"\x00\x00\x00", encode_frame(FRAME_A)[:-1]])
def test_truncated_frame_at_eof(partial: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(partial)
    assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(b"")
    assert decoder.eof
    with pytest.raises(FrameError, match="truncated"):
        decoder.next_frame()


def test_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(FRAME_B))
    decoder.receive_data(b"")
    assert decoder.next_frame() == FRAME_B
    assert decoder.next_frame() is NEED_DATA


def test_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


def test_feeding_without_draining_is_a_local_error() -> None:
    decoder = FrameDecoder(max_frame_bytes=16)
    wire = encode_frame({"op": "x"}) * 10
    decoder.receive_data(wire)
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")
    # Draining first is fine.
    assert len(decoder.frames()) == 10
    decoder.receive_data(encode_frame({"op": "y"}))
    assert decoder.frames() == [{"op": "y"}]


def test_bad_max_frame_bytes() -> None:
    with pytest.raises(ValueError, match="max_frame_bytes"):
        FrameDecoder(0)


def _ext(code: int, data: bytes) -> bytes:
    packed: bytes = msgpack.packb(msgpack.ExtType(code, data))
    return packed


_BAD_PAYLOADS: dict[str, bytes] = {
    "empty": b"",
    "array": msgpack.packb([1, 2]),
    "int": msgpack.packb(1),
    "nil": b"\xc0",
    "no op": msgpack.packb({"rid": 1}),
    "op not str": msgpack.packb({"op": 1}),
    "op is bin": msgpack.packb({"op": b"send"}, use_bin_type=True),
    "op is nil": msgpack.packb({"op": None}),
    "trailing byte": msgpack.packb({"op": "x"}) + b"\xc0",
    "trailing map": msgpack.packb({"op": "x"}) * 2,
    "truncated map": msgpack.packb({"op": "x", "y": "zzz"})[:-1],
    "bin value": msgpack.packb({"op": "x", "b": b"abc"}, use_bin_type=True),
    "empty bin value": msgpack.packb({"op": "x", "b": b""}, use_bin_type=True),
    "nested empty bin": msgpack.packb({"op": "x", "l": [[b""]]}, use_bin_type=True),
    "bin key": msgpack.packb({"op": "x", b"k": 1}, use_bin_type=True),
    "empty bin key": msgpack.packb({"op": "x", b"": 1}, use_bin_type=True),
    "nested empty bin key": msgpack.packb({"op": "x", "m": {b"": 1}}, use_bin_type=True),
    "timestamp": msgpack.packb({"op": "x", "t": msgpack.Timestamp(1, 2)}),
    "timestamp 96": msgpack.packb({"op": "x", "t": msgpack.Timestamp(2**40, 5)}),
    "timestamp fixext4": b"\x82\xa2op\xa1x\xa1t\xd6\xff\x00\x00\x00\x00",
    "ext": msgpack.packb({"op": "x", "e": msgpack.ExtType(5, b"data")}),
    "ext empty": b"\x82\xa2op\xa1x\xa1e\xc7\x00\x05",
    "ext -1 empty": b"\x82\xa2op\xa1x\xa1e\xc7\x00\xff",
    "ext top level": _ext(1, b"x"),
    "int key": msgpack.packb({"op": "x", 1: 2}),
    "nested int key": msgpack.packb({"op": "x", "m": {"a": {1: 2}}}),
    "float key": msgpack.packb({"op": "x", 1.5: 2}),
    "nil key": msgpack.packb({"op": "x", None: 2}),
    "nan": msgpack.packb({"op": "x", "f": math.nan}),
    "inf": msgpack.packb({"op": "x", "f": [math.inf]}),
    "-inf float32": msgpack.packb({"op": "x", "f": {"g": -math.inf}}, use_single_float=True),
    "bad utf8": b"\x81\xa2op\xa2\xff\xfe",
    "bad utf8 key": b"\x81\xa2\xff\xfe\xa1x",
    "deep arrays": b"\x82\xa2op\xa1x\xa1d" + b"\x91" * 10000 + b"\xc0",
    "deep maps": b"\x82\xa2op\xa1x\xa1d" + b"\x81\xa1k" * 10000 + b"\xc0",
    "deep top level": b"\x91" * 10000 + b"\xc0",
    "huge array header": b"\x82\xa2op\xa1x\xa1d\xdd\xff\xff\xff\xff",
    "huge str header": b"\x82\xa2op\xa1x\xa1d\xdb\xff\xff\xff\xff",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "reserved byte": b"\x82\xa2op\xa1x\xa1d\xc1",
}


# A WebSocket binary message may hold several maps: these are fine after a map.
_FINE_AFTER_A_MAP = {"empty", "trailing map"}


@pytest.mark.parametrize("name", list(_BAD_PAYLOADS))
def test_bad_payloads(name: str) -> None:
    payload = _BAD_PAYLOADS[name]
    with pytest.raises(FrameError):
        unpack_map(payload)
    with pytest.raises(FrameError):
        decode_all(framed(payload))
    if name == "trailing map":  # two maps: fine in one WebSocket message
        assert len(decode_ws(payload)) == 2
    else:
        with pytest.raises(FrameError):
            decode_ws(payload)
    if name not in _FINE_AFTER_A_MAP:
        with pytest.raises(FrameError):
            decode_ws(msgpack.packb({"op": "ok"}) + payload)


def test_timestamps_never_become_datetimes() -> None:
    payload = msgpack.packb({"op": "x", "t": msgpack.Timestamp(0, 0)}, datetime=False)
    with pytest.raises(FrameError):
        unpack_map(payload)


def test_moderately_deep_nesting_is_fine() -> None:
    value: Any = "leaf"
    for _ in range(100):
        value = [value]
    frame = {"op": "x", "d": value}
    assert decode_all(encode_frame(frame)) == [frame]
    assert decode_ws(to_json(frame)) == [frame]


def test_unpack_map_limit() -> None:
    payload = pack({"op": "x", "b": "y" * 100})
    with pytest.raises(FrameError, match="max_frame_bytes"):
        unpack_map(payload, max_frame_bytes=50)


def test_one_megabyte_of_random_bytes() -> None:
    junk = os.urandom(1 << 20)
    decoder = FrameDecoder()
    decoder.receive_data(junk)
    try:
        frames_out = drain(decoder)
    except FrameError:
        pass
    else:
        assert all(isinstance(frame, dict) for frame in frames_out)
    with pytest.raises(FrameError):
        decode_ws(junk)
    with pytest.raises(FrameError):
        decode_ws(b"\x81" + junk[: (1 << 20) - 1])


# ---------------------------------------------------------------- fuzzing


def _feed_chunks(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> None:
    """Feed ``data`` in chunks of ``sizes`` (cycled); drain after each chunk."""
    pos = 0
    index = 0
    try:
        while pos < len(data):
            size = sizes[index % len(sizes)] if sizes else len(data)
            index += 1
            decoder.receive_data(data[pos : pos + size])
            pos += size
            for frame in drain(decoder, limit=len(data) + 2):
                assert type(frame) is dict
                assert type(frame["op"]) is str
        decoder.receive_data(b"")
        drain(decoder, limit=len(data) + 2)
    except FrameError:
        pass


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(1, 300), max_size=20))
def test_arbitrary_bytes_in_arbitrary_chunks(data: bytes, sizes: list[int]) -> None:
    _feed_chunks(FrameDecoder(max_frame_bytes=1024), data, sizes)


_pieces = st.one_of(
    frames.map(encode_frame),
    st.binary(max_size=40),
    frames.map(pack).map(framed),
    st.binary(max_size=8).map(framed),
    json_values.map(lambda v: framed(msgpack.packb(v))),
)


@FUZZ
@given(st.lists(_pieces, max_size=8), st.lists(st.integers(1, 64), max_size=10))
def test_frames_mixed_with_garbage(pieces: list[bytes], sizes: list[int]) -> None:
    _feed_chunks(FrameDecoder(max_frame_bytes=2048), b"".join(pieces), sizes)


@FUZZ
@given(frames, st.data())
def test_mutated_frames(frame: dict[str, Any], data: st.DataObject) -> None:
    wire = bytearray(pack(frame))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(wire) - 1))
        wire[index] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_ws(bytes(wire))
    except FrameError:
        pass
    else:
        assert all(type(f) is dict and type(f["op"]) is str for f in decoded)
    _feed_chunks(FrameDecoder(), framed(bytes(wire)), [7])


@FUZZ
@given(st.binary(max_size=3000))
def test_decode_ws_arbitrary_bytes(data: bytes) -> None:
    try:
        decoded = decode_ws(data, max_frame_bytes=1024, max_message_bytes=2048)
    except FrameError:
        return
    assert decoded
    assert all(type(f) is dict and type(f["op"]) is str for f in decoded)


@FUZZ
@given(
    st.text(max_size=300) | st.text(alphabet='{}[]":,0123456789.eE-+ \\untrueflsaNIfy', max_size=80)
)
def test_decode_ws_arbitrary_text(text: str) -> None:
    try:
        decoded = decode_ws(text)
    except FrameError:
        return
    assert len(decoded) == 1
    assert type(decoded[0]["op"]) is str


@FUZZ
@given(st.dictionaries(st.text(max_size=5), json_values, max_size=5), st.data())
def test_mutated_json(obj: dict[str, Any], data: st.DataObject) -> None:
    text = list(json.dumps({"op": "x", **obj}))
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(text) - 1))
        text[index] = data.draw(st.sampled_from('{}[]":,0e.-\\u'))
    try:
        decoded = decode_ws("".join(text))
    except FrameError:
        return
    # Whatever decodes must re-encode both ways.
    assert decode_ws(encode_ws(decoded[0], text=False)) == decoded
    assert decode_ws(encode_ws(decoded[0], text=True)) == decoded


# ---------------------------------------------------------------- WebSocket


def test_several_maps_in_one_binary_message_in_order() -> None:
    batch = [FRAME_A, FRAME_B, FRAME_C] * 5
    assert decode_ws(b"".join(pack(frame) for frame in batch)) == batch


def test_map_over_max_frame_bytes_inside_a_message() -> None:
    big = pack({"op": "x", "b": "y" * 200})
    small = pack(FRAME_B)
    with pytest.raises(FrameError):
        decode_ws(small + big + small, max_frame_bytes=150)
    with pytest.raises(FrameError, match="max_frame_bytes"):
        decode_ws(small + big + small, max_frame_bytes=len(big) - 1)
    with pytest.raises(FrameError):
        decode_ws(big, max_frame_bytes=150)
    with pytest.raises(FrameError, match="max_frame_bytes"):
        decode_ws(big, max_frame_bytes=len(big) - 1)
    assert decode_ws(small + big, max_frame_bytes=len(big)) == [FRAME_B, unpack_map(big)]


def test_message_over_max_message_bytes() -> None:
    message = pack(FRAME_B) * 100
    with pytest.raises(FrameError, match="max_message_bytes"):
        decode_ws(message, max_message_bytes=len(message) - 1)
    assert len(decode_ws(message, max_message_bytes=len(message))) == 100


def test_default_message_limit_is_one_mebibyte() -> None:
    frame = {"op": "x", "b": "y" * 60000}
    message = pack(frame) * 18
    assert len(message) > 1 << 20
    with pytest.raises(FrameError, match="max_message_bytes"):
        decode_ws(message)
    assert len(decode_ws(message[: len(pack(frame)) * 17])) == 17


@pytest.mark.parametrize(
    "message",
    [
        b"",
        pack(FRAME_A) + pack(FRAME_B)[:-1],
        pack(FRAME_A) + msgpack.packb([1]),
        pack(FRAME_A) + msgpack.packb({"no": "op"}),
        pack(FRAME_A) + b"\xc1",
    ],
    ids=["empty", "truncated last", "array after map", "no op after map", "reserved after map"],
)
def test_bad_binary_messages(message: bytes) -> None:
    with pytest.raises(FrameError):
        decode_ws(message)


_BAD_TEXTS: dict[str, str] = {
    "empty": "",
    "NaN": '{"op":"x","v":NaN}',
    "Infinity": '{"op":"x","v":Infinity}',
    "-Infinity": '{"op":"x","v":[-Infinity]}',
    "float overflow": '{"op":"x","v":1e400}',
    "int too big": '{"op":"x","v":18446744073709551616}',
    "int too small": '{"op":"x","v":-9223372036854775809}',
    "int huge": '{"op":"x","v":' + "9" * 5000 + "}",
    "array": '[{"op":"x"}]',
    "string": '"op"',
    "number": "1",
    "null": "null",
    "no op": '{"rid":1}',
    "op not str": '{"op":1}',
    "op null": '{"op":null}',
    "two objects": '{"op":"x"}{"op":"y"}',
    "trailing garbage": '{"op":"x"} x',
    "not json": "hello",
    "single quotes": "{'op':'x'}",
    "lone high surrogate": '{"op":"x","b":"\\ud800"}',
    "lone low surrogate": '{"op":"x","b":["\\uDC00"]}',
    "lone surrogate key": '{"op":"x","\\udbff":1}',
    "raw surrogate": '{"op":"x","b":"\ud800"}',
    "deep": '{"op":"x","d":' + "[" * 10000 + "]" * 10000 + "}",
    "deep objects": '{"op":"x","d":' + '{"a":' * 10000 + "1" + "}" * 10000 + "}",
}


@pytest.mark.parametrize("text", list(_BAD_TEXTS.values()), ids=list(_BAD_TEXTS))
def test_bad_text_messages(text: str) -> None:
    with pytest.raises(FrameError):
        decode_ws(text)


def test_good_text_edge_cases() -> None:
    assert decode_ws('{"op":"x","v":18446744073709551615,"w":-9223372036854775808}') == [
        {"op": "x", "v": 2**64 - 1, "w": -(2**63)}
    ]
    assert decode_ws(' {"op":"x","e":"\\ud83d\\ude00","f":1e300} \n') == [
        {"op": "x", "e": "😀", "f": 1e300}
    ]
    assert decode_ws('{"op":"x","s":"\\\\ud800"}') == [{"op": "x", "s": "\\ud800"}]


def test_oversize_text() -> None:
    frame = {"op": "x", "b": ""}
    frame["b"] = "y" * (100 - len(to_json(frame)))
    text = to_json(frame)
    assert decode_ws(text, max_frame_bytes=100) == [frame]
    with pytest.raises(FrameError, match="max_frame_bytes"):
        decode_ws(text, max_frame_bytes=99)
    # The limit is in UTF-8 bytes, not characters.
    wide = to_json({"op": "x", "b": "你" * 30})
    assert len(wide) < 100 < len(wide.encode())
    with pytest.raises(FrameError, match="max_frame_bytes"):
        decode_ws(wide, max_frame_bytes=100)
    with pytest.raises(FrameError):
        decode_ws("y" * 70000)


# ---------------------------------------------------------------- encoding errors


@pytest.mark.parametrize("bad", [[1, 2], "op", None, 1])
def test_encoding_a_non_map_is_a_local_error(bad: Any) -> None:
    with pytest.raises(LocalProtocolError):
        pack(bad)
    with pytest.raises(LocalProtocolError):
        encode_frame(bad)
    with pytest.raises(LocalProtocolError):
        to_json(bad)


def test_encoding_unencodable_values_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        pack({"op": "x", "v": object()})
    with pytest.raises(LocalProtocolError):
        pack({"op": "x", "v": 2**64})
    with pytest.raises(LocalProtocolError):
        to_json({"op": "x", "v": b"bytes"})
    with pytest.raises(LocalProtocolError):
        to_json({"op": "x", "v": math.nan})
    with pytest.raises(LocalProtocolError):
        frame_prefix(b"")


def test_reprs_and_long_error_details() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00")
    assert repr(decoder) == "<FrameDecoder open buffered=2>"
    decoder.receive_data(b"")
    assert repr(decoder) == "<FrameDecoder eof buffered=2>"
    with pytest.raises(FrameError) as info:
        decode_ws("{" + '"' * 300)
    assert len(info.value.message) < 300
