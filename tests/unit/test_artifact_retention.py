"""meshd.artifacts.retention: garbage collection never drops a pinned artifact."""

from hypothesis import given, strategies as st

from meshd.artifacts.retention import Held, NoRoom, Room, make_room, over_quota


def test_fits_without_dropping():
    assert make_room({"a": Held(10, 1)}, frozenset(), 100, 50) == Room(())


def test_least_recently_used_unpinned_go_first():
    held = {"old": Held(40, 1), "new": Held(40, 5), "pinned": Held(40, 0)}
    assert make_room(held, frozenset({"pinned"}), 130, 30) == Room(("old",))
    assert make_room(held, frozenset({"pinned"}), 130, 80) == Room(("old", "new"))


def test_pinned_space_is_never_made():
    held = {"pinned": Held(90, 0), "x": Held(5, 0)}
    outcome = make_room(held, frozenset({"pinned"}), 100, 20)
    assert isinstance(outcome, NoRoom) and "pinned" in outcome.reason
    outcome = make_room({}, frozenset(), 100, 200)
    assert isinstance(outcome, NoRoom) and "larger than the artifact quota" in outcome.reason


@given(st.dictionaries(st.sampled_from("abcdefgh"), st.tuples(st.integers(0, 50), st.integers(0, 9)), max_size=8),
       st.sets(st.sampled_from("abcdefgh")), st.integers(0, 300), st.integers(0, 120))
def test_never_a_pinned_one_and_always_enough(raw, pinned, quota, need):
    held = {d: Held(size, used) for d, (size, used) in raw.items()}
    outcome = make_room(held, frozenset(pinned), quota, need)
    if isinstance(outcome, Room):
        assert not set(outcome.remove) & pinned
        assert sum(h.size for d, h in held.items() if d not in outcome.remove) + need <= quota
    else:
        assert sum(h.size for d, h in held.items() if d in pinned) + need > quota or need > quota
    assert not set(over_quota(held, frozenset(pinned), quota)) & pinned
