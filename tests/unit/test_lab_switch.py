"""The lab switch's forwarding decision (tests.lab.switch.fate): partitions, loss, delay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.lab.switch import Impairments, Link, fate

CUT = Impairments(groups={"a": 0, "b": 0, "c": 1})
SLOW = Impairments(links={"a": Link(delay=0.05, loss=0.1)})


@pytest.mark.parametrize("imp, source, destination, draw, expected", [
    (Impairments(), "a", "b", 0.0, 0.0),  # nothing set: straight through
    (CUT, "a", "b", 0.5, 0.0),  # same side
    (CUT, "a", "c", 0.5, None),  # across the cut
    (CUT, "c", "a", 0.5, None),  # both ways
    (CUT, "router", "c", 0.5, 0.0),  # a port in no group reaches every side
    (SLOW, "a", "b", 0.05, None),  # draw under the loss rate: lost
    (SLOW, "a", "b", 0.5, 0.05),  # else delayed
    (SLOW, "b", "a", 0.05, 0.0),  # impairments apply to what a port sends, like netem on egress
    (Impairments(groups={"a": 0, "b": 1}, links={"a": Link(0.05)}), "a", "b", 0.9, None),  # the cut wins
])
def test_fate(imp, source, destination, draw, expected):
    assert fate(imp, source, destination, draw) == expected


@given(st.floats(0, 0.999), st.floats(0, 1), st.floats(0, 1))
def test_loss_rate_is_the_share_of_draws_lost(draw, loss, delay):
    imp = Impairments(links={"a": Link(delay, loss)})
    assert (fate(imp, "a", "b", draw) is None) == (draw < loss)
