import contextlib

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.io.logfiles import RotatingLog, follow, read_tail, rotated_files


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_writes_append_and_survive_reopen(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=100, keep=2)
    log.write(b"one\n")
    log.close()
    log = RotatingLog(path, max_bytes=100, keep=2)
    log.write(b"two\n")
    log.close()
    assert path.read_bytes() == b"one\ntwo\n"
    with pytest.raises(ValueError, match="closed"):
        log.write(b"x")


@pytest.mark.parametrize(
    "max_bytes, keep, message",
    [(0, 1, "max_bytes must be at least 1"), (10, -1, "keep must be 0 or more")],
)
def test_bad_settings_are_refused(tmp_path, max_bytes, keep, message):
    with pytest.raises(ValueError, match=message):
        RotatingLog(tmp_path / "output.log", max_bytes=max_bytes, keep=keep)


def test_rotates_before_a_write_that_would_overflow(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=10, keep=2)
    for chunk in (b"aaaaaa", b"bbbbbb", b"cccccc", b"dddddd"):
        log.write(chunk)
    log.close()
    assert names(tmp_path) == ["output.log", "output.log.1", "output.log.2"]
    assert path.read_bytes() == b"dddddd"
    assert (tmp_path / "output.log.1").read_bytes() == b"cccccc"
    assert (tmp_path / "output.log.2").read_bytes() == b"bbbbbb"  # aaaaaa dropped


def test_write_larger_than_max_is_split(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=4, keep=5)
    log.write(b"xy")
    log.write(b"0123456789")
    log.close()
    assert [p.read_bytes() for _, p in reversed(rotated_files(path))] == [b"xy01", b"2345"]
    assert path.read_bytes() == b"6789"


def test_keep_zero_keeps_only_the_current_file(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=5, keep=0)
    log.write(b"12345")
    log.write(b"678")
    log.close()
    assert names(tmp_path) == ["output.log"]
    assert path.read_bytes() == b"678"


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=1, max_size=40), max_size=30),
    max_bytes=st.integers(min_value=1, max_value=32),
    keep=st.integers(min_value=0, max_value=4),
)
def test_tail_is_a_suffix_of_everything_written(tmp_path_factory, writes, max_bytes, keep):
    directory = tmp_path_factory.mktemp("log")
    path = directory / "output.log"
    log = RotatingLog(path, max_bytes=max_bytes, keep=keep)
    for data in writes:
        log.write(data)
    log.close()
    everything = b"".join(writes)
    kept = read_tail(path, 10**6)
    assert everything.endswith(kept)
    if len(kept) < len(everything):
        # a file is rotated only when the next write would not fit, so any two neighbouring
        # files together hold more than max_bytes: whatever was dropped, enough was kept
        assert len(kept) > max_bytes * ((keep + 1) // 2)
        assert len(rotated_files(path)) == keep
    assert all(p.stat().st_size <= max_bytes for p in directory.iterdir())
    assert len(rotated_files(path)) <= keep
    for n in (0, 1, 7, 50):
        assert read_tail(path, n) == (kept[-n:] if n else b"")


def test_read_tail_of_missing_log_is_empty(tmp_path):
    assert read_tail(tmp_path / "nothing.log", 100) == b""


def collect(path, until, tail_bytes=0, actions=()):
    """Follow `path` while running `actions` (sync callables), each once the previous one's
    output has arrived; return the bytes received when `until` holds."""

    async def main():
        got = bytearray()
        with trio.fail_after(10):
            async with contextlib.aclosing(follow(path, poll_interval=0.01, tail_bytes=tail_bytes)) as chunks:

                async def act():
                    for action in actions:
                        before = len(got)
                        action()
                        while len(got) == before:
                            await trio.sleep(0.005)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(act)
                    async for chunk in chunks:
                        got.extend(chunk)
                        if until(bytes(got)):
                            nursery.cancel_scope.cancel()
                            break
        return bytes(got)

    return trio.run(main)


def test_follow_yields_only_new_bytes_across_rotations(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=8, keep=1)
    log.write(b"old-")
    lines = [b"line1\n", b"line2\n", b"line3\n", b"line4\n"]
    writes = [lambda d=d: log.write(d) for d in lines]
    got = collect(path, until=lambda b: b.endswith(b"line4\n"), actions=writes)
    log.close()
    assert got == b"".join(lines)


def test_follow_catches_up_on_several_rotations_between_polls(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=4, keep=5)

    def burst():
        for data in (b"aaa", b"bbb", b"ccc", b"ddd"):
            log.write(data)

    got = collect(path, until=lambda b: b.endswith(b"ddd"), actions=[burst])
    log.close()
    assert got == b"aaabbbcccddd"


def test_follow_with_tail_then_new_output(tmp_path):
    path = tmp_path / "output.log"
    log = RotatingLog(path, max_bytes=4, keep=3)
    log.write(b"1234")
    log.write(b"56")
    got = collect(path, until=lambda b: b.endswith(b"new"), tail_bytes=4, actions=[lambda: log.write(b"new")])
    log.close()
    assert got == b"3456new"


def test_follow_waits_for_the_file_and_handles_truncation(tmp_path):
    path = tmp_path / "output.log"

    def create():
        path.write_bytes(b"first\n")

    def truncate_and_rewrite():
        with open(path, "r+b") as file:
            file.truncate(0)
        with open(path, "ab") as file:
            file.write(b"new\n")  # shorter than before, so the follower sees the file shrink

    got = collect(path, until=lambda b: b.endswith(b"new\n"), actions=[create, truncate_and_rewrite])
    assert got == b"first\nnew\n"
