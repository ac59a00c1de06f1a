"""crdt.schema: what may be written into the mesh document, and reading it back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.schema import (MAX_SAFE_INT, MAX_SPEC_BYTES, AppEdit, AppSiteStatus, AuditRecord, NodeSummary,
                         SchemaError, SignedRecord, SiteSummary)

EDIT = AppEdit(edit_id="factory-a/1", app="web", version=1, base="", site="factory-a", actor="ops", ts=1.5,
               spec='[app]\nname = "web"\n', targets=("factory-a",), replicas=3)
NODE = "0123456789abcdef0123456789abcdef"
RECORDS = [
    EDIT,
    AppSiteStatus(app="web", site="factory-a", edit_id="factory-a/1", version=1, desired=3, running=2, ts=2.0),
    SiteSummary(site="factory-a", nodes=3, ready=3, leader="a-1", addresses=("198.18.1.11:7700",), ts=3.0),
    SiteSummary(site="factory-b", nodes=0, ready=0, leader=None, addresses=(), ts=3.0),
    NodeSummary(node_id=NODE, name="a-1", site="factory-a", state="ready", address="198.18.1.11:7700", arch="aarch64",
                role="leader", allocs=2, labels=("zone=hall-1",), evidence="tpm 2.0 quote", ts=1.0),
    SignedRecord(key=f"revocation/{NODE}", kind="revocation", serial=4, body="{}", site="factory-a", ts=9.0),
    AuditRecord(audit_id="factory-a/a-1/7", ts=4.25, actor="ops", action="deploy", target="web", site="factory-a"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.KIND)
def test_records_round_trip_through_their_plain_form(record):
    plain = record.to_plain()
    assert type(record).from_plain(plain) == record
    # as pycrdt gives it back: every number a float, every list a list
    as_read = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in plain.items()}
    assert type(record).from_plain(as_read) == record


@pytest.mark.parametrize("changes, reason", [
    ({"version": 2**63}, "beyond +/-2**53"),  # pycrdt would panic on this one
    ({"version": MAX_SAFE_INT + 1}, "beyond +/-2**53"),  # and silently round this one
    ({"version": 0}, "must be 1 or more"),
    ({"version": 1.5}, "expected an integer"),
    ({"version": True}, "expected int"),
    ({"ts": math.nan}, "not a finite number"),
    ({"ts": math.inf}, "not a finite number"),
    ({"app": "Web"}, "not a valid app"),
    ({"app": "a" * 64}, "longer than 63 bytes"),
    ({"site": ""}, "not a valid site"),
    ({"edit_id": "a b"}, "not a valid edit_id"),
    ({"base": "x y"}, "not a valid edit id"),
    ({"actor": "x\x00y"}, "NUL"),
    ({"actor": "\ud800"}, "not valid Unicode"),
    ({"spec": "x" * (MAX_SPEC_BYTES + 1)}, "longer than"),
    ({"targets": ()}, "at least one site"),
    ({"targets": ("ok", "NOT OK")}, "targets[1]"),
    ({"targets": tuple(f"s{i}" for i in range(300))}, "more than 256"),
    ({"replicas": -1}, "must not be negative"),
    ({"stopped": 1}, "expected true or false"),
])
def test_a_bad_field_is_refused_with_a_reason_naming_it(changes, reason):
    import dataclasses
    with pytest.raises(SchemaError) as refused:
        dataclasses.replace(EDIT, **changes).to_plain()
    assert reason in refused.value.reason
    assert refused.value.reason.startswith("app edit")


@pytest.mark.parametrize("value, reason", [
    ("a string", "expected a record"),
    ([1, 2], "expected a record"),
    ({**EDIT.to_plain(), "extra": 1}, "unknown field 'extra'"),
    ({k: v for k, v in EDIT.to_plain().items() if k != "spec"}, "app edit.spec: missing"),
    ({**EDIT.to_plain(), "targets": "factory-a"}, "expected a list"),
    ({**EDIT.to_plain(), "version": "1"}, "expected int"),
])
def test_what_is_read_back_must_be_a_whole_record_of_its_kind(value, reason):
    with pytest.raises(SchemaError) as refused:
        AppEdit.from_plain(value)
    assert reason in refused.value.reason


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_any_int_is_either_held_exactly_or_refused(n):
    try:
        plain = AppSiteStatus(app="a", site="s", edit_id="e", version=n, desired=0, running=0, ts=0.0).to_plain()
    except SchemaError:
        assert abs(n) > MAX_SAFE_INT
        return
    assert float(plain["version"]) == n and int(float(plain["version"])) == n  # exact through float64


def test_an_added_field_is_written_only_when_used_and_read_without_it():
    plain = AuditRecord(audit_id="a/1", ts=1.0, actor="ops", action="deploy", target="web", site="a").to_plain()
    assert "reason" not in plain  # a member that predates the field reads this record as before
    assert AuditRecord.from_plain(plain).reason == ""
    why = AuditRecord(audit_id="a/2", ts=1.0, actor="n2", action="join-refused", target="x", site="a",
                      reason="token proof does not match")
    assert AuditRecord.from_plain(why.to_plain()) == why
    with pytest.raises(SchemaError, match="reason: longer than"):
        AuditRecord.from_plain(dict(why.to_plain(), reason="x" * 5000))
