"""Reading the lab's peers (tests.lab.serf, tests.lab.avahi): the lines the benchmark times are
recognised exactly, and nothing else is taken for them. Lines are as serf 0.8/0.9 and
avahi-browse 0.8 print them (seen on this machine)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.lab.avahi import parse_resolved, parse_txt
from tests.lab.serf import MemberEvent, parse_event

RESOLVED = ('=;eth0;IPv4;cdc20c15f0d6f53b;_meshd._tcp;local;meshd-cdc20c15f0d6f53b.local;198.18.1.11;55361;'
            '"v=0.1.0" "fp=cdc20c15f0d6f53b526af33270e63839" "site=s" "id=cdc20c15f0d6f53b526af33270e63839"')


@pytest.mark.parametrize("line, expected", [
    ("    2026/11/22 05:02:16 [INFO] serf: EventMemberJoin: s-4 198.18.1.14", ("join", "s-4", "198.18.1.14")),
    ("    2026/11/22 05:02:26 [INFO] serf: EventMemberFailed: s-3 198.18.1.13", ("failed", "s-3", "198.18.1.13")),
    ("    2026/11/22 05:02:26 [INFO] serf: EventMemberLeave: s-2 198.18.1.12", ("leave", "s-2", "198.18.1.12")),
])
def test_serf_member_events_are_read_with_their_arrival_time(line, expected):
    assert parse_event(line, 12.5) == MemberEvent(12.5, *expected)


@pytest.mark.parametrize("line", [
    "    2026/11/22 05:02:17 [INFO] agent: Received event: member-join",  # the handler's, a second late
    "    2026/11/22 05:02:22 [INFO] memberlist: Suspect s-3 has failed, no acks received",
    "    2026/11/22 05:02:16 [INFO] agent: joining: [198.18.1.14:7946 198.18.1.12:7946] replay: false",
    "==> Serf agent running!",
    "",
])
def test_other_serf_lines_are_not_member_events(line):
    assert parse_event(line, 0.0) is None


def test_a_resolved_meshd_instance_is_read_field_by_field():
    seen = parse_resolved(RESOLVED, 3.0)
    assert (seen.at, seen.interface, seen.instance, seen.service_type) == (3.0, "eth0", "cdc20c15f0d6f53b", "_meshd._tcp")
    assert (seen.host_name, seen.address, seen.port) == ("meshd-cdc20c15f0d6f53b.local", "198.18.1.11", 55361)
    assert seen.txt == {"v": "0.1.0", "fp": "cdc20c15f0d6f53b526af33270e63839", "site": "s",
                        "id": "cdc20c15f0d6f53b526af33270e63839"}


@pytest.mark.parametrize("line", [
    "+;eth0;IPv4;cdc20c15f0d6f53b;_meshd._tcp;local",  # listed, not yet resolved
    "-;eth0;IPv4;cdc20c15f0d6f53b;_meshd._tcp;local",  # removed
    RESOLVED.replace(";IPv4;", ";IPv6;"),  # the lab is IPv4; an IPv6 record is not this answer
    RESOLVED.replace(";55361;", ";port;"),
    RESOLVED.rsplit(";", 1)[0],  # a field short
    "Failed to create client object: Daemon not running",
])
def test_anything_but_a_resolved_ipv4_line_is_ignored(line):
    assert parse_resolved(line, 0.0) is None


def test_txt_values_may_hold_equals_signs_and_keys_without_values_are_dropped():
    assert parse_txt('"a=b=c" "flag" "k="') == {"a": "b=c", "k": ""}


@given(st.text())
def test_parsers_never_raise_on_any_line(line):
    parse_event(line, 0.0)
    parse_resolved(line, 0.0)
