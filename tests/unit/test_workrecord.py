"""meshd.io.workrecord: what a node last ran, whole and checked, or nothing."""

from __future__ import annotations

import logging

import pytest

from meshd.io import workrecord
from meshd.node.effects import Workload
from meshd.state import HealthCheck, ResourceRequest

from tests.smalldisk import fill

WORKLOADS = (
    Workload(alloc_id="a1", app="svc", command=("sleep", "30"), env={"K": "v"}, restart_policy="always", site="lab"),
    Workload(alloc_id="a2", app="web", command=("python3", "-m", "http.server"), env={}, restart_policy="on-failure",
             health=HealthCheck(kind="http", port=8080, path="/ok", command=("true",), interval_s=2.0), site="lab",
             limits=ResourceRequest(cpu=0.5, memory_mb=64, pids=10, devices=(("gpu", 1),))),
)


def test_a_record_comes_back_exactly(tmp_path):
    workrecord.save(tmp_path, WORKLOADS)
    assert workrecord.load(tmp_path) == WORKLOADS
    workrecord.save(tmp_path, ())
    assert workrecord.load(tmp_path) == ()


def test_no_record_is_none(tmp_path):
    assert workrecord.load(tmp_path) is None


@pytest.mark.parametrize("damage", ["empty", "half", "flip", "garbage", "other_json", "bad_field"])
def test_a_damaged_record_stands_for_nothing_and_says_so(tmp_path, caplog, damage):
    workrecord.save(tmp_path, WORKLOADS)
    path = tmp_path / workrecord.RECORD_FILE
    data = path.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "half":
        data = data[: len(data) // 2]
    elif damage == "flip":
        i = data.index(b"sleep")
        data = data[:i] + b"sleeq" + data[i + 5:]  # still JSON: only the checksum finds it
    elif damage == "garbage":
        data = bytes(range(256)) * 4
    elif damage == "other_json":
        data = b'{"crc32": 1}'
    else:  # a right checksum over a body that is not a record
        data = workrecord.json.dumps({"crc32": workrecord.zlib.crc32(b'[{"alloc_id": 3}]'),
                                      "workloads": '[{"alloc_id": 3}]'}).encode()
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="meshd.daemon"):
        assert workrecord.load(tmp_path) is None
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_a_full_disk_keeps_the_previous_record(small_disk, caplog):
    workrecord.save(small_disk, WORKLOADS)
    fill(small_disk)  # a real tmpfs, really full
    with caplog.at_level(logging.WARNING, logger="meshd.daemon"):
        workrecord.save(small_disk, WORKLOADS[:1] * 2000)
    assert workrecord.load(small_disk) == WORKLOADS
    assert any("previous one stays" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", workrecord.RECORD_FILE]  # no temp file left
