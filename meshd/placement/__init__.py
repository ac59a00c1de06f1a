"""Placement: which node runs which replica, and why the others cannot.

feasible (checkers, each rejection with a reason) -> rank (order the feasible nodes) ->
plan (make a plan on the leader's view, re-check it against the latest state on apply).
Everything here is pure: no I/O, no clock.
"""

from meshd.placement.feasible import CHECKERS, Reserved, check_node
from meshd.placement.plan import Filtered, Placement, Plan, make_plan, recheck_plan
from meshd.placement.rank import ALGORITHMS

__all__ = [
    "ALGORITHMS",
    "CHECKERS",
    "Filtered",
    "Placement",
    "Plan",
    "Reserved",
    "check_node",
    "make_plan",
    "recheck_plan",
]
