"""meshd.io.logview: `meshctl logs --tail N` counts lines, across rotated files, reading
no more of a large log than it needs; answers of any size go out in pieces that fit a frame."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trio

from meshd.io import logview, peer
from meshd.io.logfiles import RotatingLog
from meshd.wire import ADMIN_MAX_FRAME, encode_frame


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


# --- serving: answers of any size are sent in pieces that fit a frame -----------------------

def _node_with_log(tmp_path, data: bytes):
    """What serve_local_logs reads of the node: its supervisor's log path and its name."""
    alloc_dir = tmp_path / "a1"
    alloc_dir.mkdir()
    log = RotatingLog(alloc_dir / "output.log", max_bytes=64 * 1024 * 1024, keep=1)
    log.write(data)
    supervisor = SimpleNamespace(log_path=lambda alloc_id: alloc_dir / "output.log")
    return SimpleNamespace(supervisor=supervisor, config=SimpleNamespace(name="n1")), log


def _serve(ctx, follow=False, tail=None, lines=None, then=None):
    sent: list[dict] = []

    async def send(item: dict) -> None:
        encode_frame({"stream": item}, max_frame=ADMIN_MAX_FRAME)  # what the admin socket does
        sent.append(item)

    async def run():
        sent.append({"final": await logview.serve_local_logs(ctx, "a1", follow, tail, send, lines=lines)})

    async def main():
        if then is None:
            return await run()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await then(sent)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return sent


def test_a_tail_larger_than_a_frame_arrives_whole_in_pieces(tmp_path):
    # Control characters escape to six bytes each in JSON: the worst case for a frame.
    text = "".join(f"{i:06d} \x01\x02\x03 é€ line\n" for i in range(200_000))  # ~5 MB
    ctx, _ = _node_with_log(tmp_path, text.encode())
    sent = _serve(ctx, lines=200_000, tail=None)
    assert len(sent) > 16
    assert "".join(item.get("data", item.get("final", {}).get("data", "")) for item in sent) == text
    assert all(len(json.dumps(item)) < ADMIN_MAX_FRAME for item in sent)


def test_a_multi_byte_character_is_never_cut_between_pieces(tmp_path):
    text = "x" + "€" * (logview.SEND_CHUNK // 3 + 10)  # a 3-byte character straddles the boundary
    ctx, _ = _node_with_log(tmp_path, text.encode())
    sent = _serve(ctx, tail=10**6)
    assert "\ufffd" not in "".join(str(item) for item in sent)
    assert "".join(item.get("data") or item["final"]["data"] for item in sent) == text


@pytest.mark.parametrize("tail,lines", [(None, logview.MAX_TAIL_LINES + 1), (None, -1), (None, "3"),
                                         (logview.MAX_LOG_TAIL + 1, None), (True, None)])
def test_a_tail_out_of_range_is_refused_with_its_bounds(tmp_path, tail, lines):
    ctx, _ = _node_with_log(tmp_path, b"hello\n")
    with pytest.raises(peer.PeerError, match=r"--tail must be a number of (lines|bytes) from 0 to \d+"):
        _serve(ctx, tail=tail, lines=lines)


def test_a_burst_while_following_arrives_in_pieces_not_as_one_unsendable_chunk(tmp_path):
    ctx, log = _node_with_log(tmp_path, b"old\n")
    burst = b"\x01" * (3 * 1024 * 1024) + b"\n"  # written between two polls; 18 MiB escaped

    async def write_then_read(sent):
        await trio.sleep(0.3)
        log.write(burst)
        with trio.fail_after(20):
            while sum(len(i.get("data", "")) for i in sent) < len(burst) + 4:
                await trio.sleep(0.05)

    sent = _serve(ctx, follow=True, tail=4, then=write_then_read)
    assert "".join(i["data"] for i in sent) == "old\n" + burst.decode()
    assert all(len(i["data"]) <= logview.SEND_CHUNK for i in sent)


def test_meshctl_checks_the_same_tail_bound_as_the_daemon():
    from meshd.cli import meshctl
    assert meshctl.MAX_TAIL_LINES == logview.MAX_TAIL_LINES
