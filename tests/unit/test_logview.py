"""meshd.io.logview: `meshctl logs --tail N` counts lines, across rotated files, reading
no more of a large log than it needs."""

from __future__ import annotations

from meshd.io import logview
from meshd.io.logfiles import RotatingLog


def test_the_tail_is_the_last_lines_across_rotations_and_a_partial_last_line_counts(tmp_path):
    log = RotatingLog(tmp_path / "output.log", max_bytes=1000, keep=5)
    for i in range(300):  # about 3 KB: the lines span the rotated files
        log.write(f"line {i}\n".encode())
    log.write(b"partial")
    path = tmp_path / "output.log"
    assert logview.last_lines(path, 3) == b"line 298\nline 299\npartial"
    assert logview.last_lines(path, 0) == b""
    assert logview.last_lines(path, 250).splitlines()[0] == b"line 51"  # 249 whole lines and the partial one
    assert logview.last_lines(tmp_path / "missing.log", 5) == b""


def test_a_tail_of_long_lines_reads_more_until_it_has_them_and_no_more_than_the_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(logview, "DEFAULT_LOG_TAIL", 100)
    monkeypatch.setattr(logview, "MAX_LOG_TAIL", 1600)
    log = RotatingLog(tmp_path / "output.log", max_bytes=10**6, keep=1)
    for i in range(20):
        log.write(f"{i:02d} ".encode() + b"x" * 197 + b"\n")  # 200 bytes a line
    path = tmp_path / "output.log"
    assert logview.last_lines(path, 3) == b"".join(f"{i:02d} ".encode() + b"x" * 197 + b"\n" for i in (17, 18, 19))
    assert len(logview.last_lines(path, 20).splitlines()) == 8  # 1600 bytes hold 8 of them: the bound holds
