"""Hypothesis strategies for JSON-compatible values and frames."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from protocol.schema import CLIENT_OPS, OPS

json_scalars: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)

json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def _with_op(op: str, rest: dict[str, Any]) -> dict[str, Any]:
    return {**rest, "op": op}


#: Frames: JSON-compatible maps with a string "op".
frames: st.SearchStrategy[dict[str, Any]] = st.builds(
    _with_op,
    st.text(max_size=12),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
)

_FIELD_NAMES = sorted({name for schema in OPS.values() for name in schema.fields})

#: Maps that look like client requests: a known op, known and unknown field
#: names, arbitrary JSON values.
client_like_frames: st.SearchStrategy[dict[str, Any]] = st.builds(
    _with_op,
    st.sampled_from(sorted(CLIENT_OPS)),
    st.dictionaries(
        st.sampled_from(_FIELD_NAMES) | st.text(max_size=8),
        json_values,
        max_size=10,
    ),
)
