"""meshd.io.metrics: the exposition parses with the reference parser, follows Prometheus's
naming, keeps its label sets bounded, counts what it says it counts; the endpoint answers
GET /metrics and nothing else, and bounds what a client can hold of it."""

from __future__ import annotations

import socket

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshd import commands as cmds
from meshd.config import NodeConfig
from meshd.io import metrics
from meshd.io.context import NodeContext


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, **labels) -> float:
    family = next(f for f in fams.values() if any(s.name == name for s in f.samples))
    [sample] = [s for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sample.value


@pytest.fixture
def ctx(tmp_path):
    return NodeContext(NodeConfig(data_dir=str(tmp_path), name="n1", metrics="127.0.0.1:0"))


def test_a_daemon_before_it_has_a_site_renders_a_valid_exposition(ctx):
    fams = families(ctx.metrics.render().decode())
    assert all(name.startswith("meshd_") for name in fams)
    for family in fams.values():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    assert value(fams, "meshd_raft_role", role="leader") == 0
    assert value(fams, "meshd_build_info", node="n1") == 1
    assert "meshd_process_resident_memory_bytes" in {s.name for f in fams.values() for s in f.samples}
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)


def test_counters_move_with_what_they_count(ctx):
    before = families(ctx.metrics.render().decode())
    assert value(before, "meshd_liveness_transitions_total", to="down") == 0
    down = cmds.SetLiveness(node_id="a" * 32, liveness="down", reason="missed heartbeat lease of 1s")
    ctx.counted(down, cmds.Ok())
    ctx.counted(down, cmds.Refused("fenced", "an older term"))
    ctx.counted(down, None)  # did not commit
    ctx.event("membership", "admitted n2")
    after = families(ctx.metrics.render().decode())
    assert value(after, "meshd_liveness_transitions_total", to="down") == 1  # only what committed
    assert value(after, "meshd_commands_total", op="set_liveness", outcome="ok") == 1
    assert value(after, "meshd_commands_total", op="set_liveness", outcome="refused") == 1
    assert value(after, "meshd_commands_total", op="set_liveness", outcome="not_committed") == 1
    assert value(after, "meshd_events_total", kind="membership") == 1


def test_label_values_come_from_bounded_sets(ctx):
    for i in range(50):  # many nodes, many apps: never a label of their own
        ctx.event("membership", f"admitted node-{i}", node=f"node-{i}")
        ctx.counted(cmds.SetLiveness(node_id=f"{i:032x}", liveness="ready"), cmds.Ok())
    fams = families(ctx.metrics.render().decode())
    labels = {(k, v) for f in fams.values() for s in f.samples for k, v in s.labels.items()}
    assert not any(v.startswith("node-") for k, v in labels if k != "node"), labels
    assert {v for k, v in labels if k == "node"} == {"n1"}  # this daemon's own name, in meshd_build_info only


def test_two_daemons_in_one_process_keep_their_own_figures(tmp_path):
    a = NodeContext(NodeConfig(data_dir=str(tmp_path / "a"), name="a"))
    b = NodeContext(NodeConfig(data_dir=str(tmp_path / "b"), name="b"))
    a.event("sync", "sync with site x down")
    assert value(families(a.metrics.render().decode()), "meshd_events_total", kind="sync") == 1
    assert "meshd_events_total" not in {s.name for f in families(b.metrics.render().decode()).values()
                                        for s in f.samples}


# --- the endpoint --------------------------------------------------------------------------

async def _exchange(address, data: bytes, *, half_close: bool = False) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(data)
    if half_close:
        await stream.send_eof()
    answer = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            answer += chunk
    await stream.aclose()
    return answer


async def _serving(nursery, body: bytes = b"meshd_up 1\n"):
    return await nursery.start(metrics.serve_metrics, "127.0.0.1", 0, lambda: body)


async def _get_metrics_is_served_and_parses():
    async with trio.open_nursery() as nursery:
        address = await _serving(nursery)
        answer = await _exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/plain; version=0.0.4" in head
        assert [s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples] == [1.0]
        head_only = await _exchange(address, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200 OK") and head_only.endswith(b"\r\n\r\n")
        nursery.cancel_scope.cancel()


def test_get_metrics_is_served_and_parses():
    trio.run(_get_metrics_is_served_and_parses)


async def _anything_else_is_refused_with_a_status(request_bytes, status):
    async with trio.open_nursery() as nursery:
        address = await _serving(nursery)
        answer = await _exchange(address, request_bytes)
        assert answer.split(b" ")[1] == status, answer[:80]
        assert (await _exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")  # still serving
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metrics/../x HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"\x16\x03\x01\x02\x00" + bytes(range(256)) + b"\r\n\r\n", b"405"),  # a TLS hello, or any junk
])
def test_anything_else_is_refused_with_a_status(request_bytes, status):
    trio.run(_anything_else_is_refused_with_a_status, request_bytes, status)


async def _a_client_that_says_nothing_is_dropped_and_a_crowd_is_turned_away():
    async with trio.open_nursery() as nursery:
        address = await _serving(nursery)
        idle = [await trio.open_tcp_stream(*address) for _ in range(metrics.MAX_CONNECTIONS)]
        await trio.sleep(0.2)
        # one more is closed at once, without an answer
        assert await _exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        with trio.fail_after(metrics.REQUEST_TIMEOUT + 5):  # the silent ones go after the timeout
            for stream in idle:
                assert await stream.receive_some(10) == b""
        assert (await _exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()


def test_a_client_that_says_nothing_is_dropped_and_a_crowd_is_turned_away():
    trio.run(_a_client_that_says_nothing_is_dropped_and_a_crowd_is_turned_away)


async def _a_port_in_use_is_an_oserror_before_it_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError):
                await nursery.start(metrics.serve_metrics, "127.0.0.1", port, lambda: b"")


def test_a_port_in_use_is_an_oserror_before_it_starts():
    trio.run(_a_port_in_use_is_an_oserror_before_it_starts)
