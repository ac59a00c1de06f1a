from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.placement.rank import ALGORITHMS, Candidate, rank, rank_key


def c(node_id, app_allocs=0, allocs=0, free_mem_mb=0) -> Candidate:
    return Candidate(node_id=node_id, app_allocs=app_allocs, allocs=allocs, free_mem_mb=free_mem_mb)


@pytest.mark.parametrize(
    "algorithm,candidates,expected",
    [
        # spread: fewest of this app first ...
        ("spread", [c("a", app_allocs=2), c("b", app_allocs=1), c("c", app_allocs=3)], ["b", "a", "c"]),
        # ... then fewest allocations overall ...
        ("spread", [c("a", 1, allocs=5), c("b", 1, allocs=2)], ["b", "a"]),
        # ... app count beats overall count ...
        ("spread", [c("a", 0, allocs=9), c("b", 1, allocs=1)], ["a", "b"]),
        # ... then most free memory ...
        ("spread", [c("a", 0, 1, free_mem_mb=100), c("b", 0, 1, free_mem_mb=900)], ["b", "a"]),
        # ... then node id.
        ("spread", [c("b"), c("a"), c("c")], ["a", "b", "c"]),
        # binpack: most allocations first ...
        ("binpack", [c("a", allocs=1), c("b", allocs=3), c("c", allocs=2)], ["b", "c", "a"]),
        # ... ignoring how many of this app are there ...
        ("binpack", [c("a", app_allocs=5, allocs=5), c("b", app_allocs=0, allocs=6)], ["b", "a"]),
        # ... then the tightest fit ...
        ("binpack", [c("a", allocs=1, free_mem_mb=900), c("b", allocs=1, free_mem_mb=100)], ["b", "a"]),
        # ... then node id.
        ("binpack", [c("b"), c("a")], ["a", "b"]),
    ],
)
def test_rank(algorithm, candidates, expected):
    assert [x.node_id for x in rank(candidates, algorithm)] == expected


def test_default_is_spread():
    candidates = [c("a", app_allocs=1), c("b", app_allocs=0)]
    assert rank(candidates) == rank(candidates, "spread")


def test_unknown_algorithm_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown placement algorithm 'random', known: binpack, spread"):
        rank_key("random")


candidate_lists = st.lists(
    st.builds(c, st.text("abcdef", min_size=1, max_size=3), st.integers(0, 4), st.integers(0, 8),
              st.integers(0, 4096)),
    max_size=12,
    unique_by=lambda x: x.node_id,
)


@settings(max_examples=200, deadline=None)
@given(candidates=candidate_lists, algorithm=st.sampled_from(sorted(ALGORITHMS)), seed=st.integers())
def test_rank_is_a_deterministic_permutation(candidates, algorithm, seed):
    shuffled = list(candidates)
    random.Random(seed).shuffle(shuffled)
    ranked = rank(candidates, algorithm)
    assert ranked == rank(shuffled, algorithm)
    assert sorted(ranked, key=lambda x: x.node_id) == sorted(candidates, key=lambda x: x.node_id)


@settings(max_examples=200, deadline=None)
@given(candidates=candidate_lists.filter(bool))
def test_best_of_each_algorithm(candidates):
    assert rank(candidates, "spread")[0].app_allocs == min(x.app_allocs for x in candidates)
    assert rank(candidates, "binpack")[0].allocs == max(x.allocs for x in candidates)
