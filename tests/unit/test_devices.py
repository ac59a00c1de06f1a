"""meshd.io.devices: what a node has (found under a directory laid out like /dev, and
configured), and that no device is ever held by two allocations."""

from __future__ import annotations

import pytest

from meshd.io import devices
from meshd.io.devices import Device, DeviceError, DeviceSet


def test_nvidia_gpus_render_nodes_and_configured_devices_are_found(tmp_path):
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "dri/renderD128", "dri/card0", "apex_0"):
        (tmp_path / "dev" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev" / name).write_text("")
    found = devices.found({"coral": ("/dev/apex_0", "/dev/apex_1")}, root=str(tmp_path))
    assert found == [Device("gpu", "/dev/nvidia0", 0), Device("gpu", "/dev/nvidia1", 1),
                     Device("render", "/dev/dri/renderD128"), Device("coral", "/dev/apex_0")]  # apex_1 is absent
    assert devices.counts(found) == {"gpu": 2, "render": 1, "coral": 1}


def test_no_device_is_held_by_two_allocations():
    held = DeviceSet([Device("gpu", "/dev/nvidia0", 0), Device("gpu", "/dev/nvidia1", 1)])
    a = held.take("a", (("gpu", 1),))
    b = held.take("b", (("gpu", 1),))
    assert {d.path for d in a} | {d.path for d in b} == {"/dev/nvidia0", "/dev/nvidia1"} and a != b
    with pytest.raises(DeviceError, match="needs 1 gpu, 0 free of 2"):
        held.take("c", (("gpu", 1),))
    assert held.take("a", (("gpu", 1),)) == a  # a restart keeps what it held
    held.release("a")
    assert held.take("c", (("gpu", 1),)) == a
    with pytest.raises(DeviceError, match="needs 1 tpu, 0 free of 0"):
        held.take("d", (("tpu", 1),))


def test_a_workload_is_told_what_it_holds():
    env = devices.device_env([Device("gpu", "/dev/nvidia1", 1), Device("gpu", "/dev/nvidia3", 3),
                              Device("edge-tpu", "/dev/apex_0")])
    assert env == {"MESHD_DEVICE_EDGE_TPU": "/dev/apex_0", "MESHD_DEVICE_GPU": "/dev/nvidia1,/dev/nvidia3",
                   "CUDA_VISIBLE_DEVICES": "1,3", "NVIDIA_VISIBLE_DEVICES": "1,3"}
