"""crdt.updatecheck: every update pycrdt writes passes the walk; updates whose declared counts
would make pycrdt reserve memory they cannot fill are refused before it sees them."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment

from crdt.updatecheck import UpdateRejected, check_state_vector, check_update, check_update_reach, decode_state_vector

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["map", "nested", "array", "text", "delete", "xml"]), st.text(max_size=6),
                          values), max_size=12))
def test_every_update_pycrdt_writes_passes(ops):
    doc = Doc()
    root, arr, text = doc.get("m", type=Map), doc.get("a", type=Array), doc.get("t", type=Text)
    frag = doc.get("x", type=XmlFragment)
    states = [doc.get_state()]
    for op, key, value in ops:
        if op == "map":
            root[key] = value
        elif op == "nested":
            root[key] = Map({"inner": value, "list": Array([1, "two"])})
        elif op == "array":
            arr.append(value)
        elif op == "text":
            text.insert(len(text), key or "x", {"bold": True} if key else None)
        elif op == "xml":
            frag.children.append(XmlElement("p", {"class": key}))
        elif op == "delete":
            if key in root:
                del root[key]
            if len(arr):
                del arr[0]
            if len(text):
                del text[0:1]
        states.append(doc.get_state())
    check_update(doc.get_update())
    for state in states:
        check_update(doc.get_update(state))
        check_state_vector(state)


@pytest.mark.parametrize("update, reason", [
    (b"\x80\x80\x80\x7f", "declares"),  # 2**28 clients in 0 bytes: pycrdt would take 500 MB
    (b"\x01\x80\x80\x809\x00\x00", "declares"),  # one client with ~10**8 structs
    (b"\x00\x01\x00\xff\xff\xff\x0f", "declares"),  # a delete set with 2**32 ranges
    (b"\x01\x01\x05\x00\x1f\x01\x01m", "unknown content kind"),
    (b"\x01\x01\x05", "cut short"),
    (b"\x00\x00\x00", "after the end"),
    (b"\xff" * 12, "varint longer than 64 bits"),
])
def test_updates_declaring_more_than_they_hold_are_refused(update, reason):
    with pytest.raises(UpdateRejected) as refused:
        check_update(update)
    assert reason in refused.value.reason


def test_a_state_vector_declaring_more_clients_than_bytes_is_refused():
    with pytest.raises(UpdateRejected, match="declares"):
        check_state_vector(b"\x80\x80\x80\x7f")


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_random_bytes_are_either_refused_or_safe_for_pycrdt(data):
    try:
        check_update(data)
    except UpdateRejected:
        return
    started = time.process_time()
    try:
        Doc().apply_update(data)
    except ValueError:
        pass
    assert time.process_time() - started < 0.05


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["map", "delete"]), st.text(max_size=4), st.text(max_size=30)), min_size=1,
                max_size=15))
def test_an_updates_reach_is_a_lower_bound_above_what_the_replica_it_was_made_for_holds(ops):
    # crdt.document.MeshDocument.apply skips comparing delete sets for an update whose reach
    # is above its own clocks: such an update surely brings items
    doc = Doc(client_id=1)
    root = doc.get("m", type=Map)
    states = [doc.get_state()]
    for op, key, value in ops:
        if op == "map":
            root[key] = value
        elif key in root:
            del root[key]
        states.append(doc.get_state())
    final = decode_state_vector(doc.get_state())
    for state in states:
        structs, _, reach = check_update_reach(doc.get_update(state))
        assert all(clock <= final[client] for client, clock in reach.items())
        held = decode_state_vector(state)
        assert (structs > 0) == any(clock > held.get(client, 0) for client, clock in reach.items())
