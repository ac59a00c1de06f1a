"""The devices of this node that workloads may ask for (`[app.resources] devices = { gpu = 1 }`),
and which workload holds which.

Found at start and again with every resource sample: NVIDIA GPUs (`/dev/nvidia0`, ... kind
`gpu`, named by `nvidia-smi` when it is there), render nodes (`/dev/dri/renderD128`, ... kind
`render`), plus what the config names (`--device coral=/dev/apex_0`, a `[devices]` table).

Invariants:
- The site counts devices (meshd.placement.feasible.check_devices); the node picks which ones:
  an instance is held by at most one live allocation at a time, from its start until it
  ends for good, so no device is ever handed to two workloads.
- A workload is told what it holds: `MESHD_DEVICE_<KIND>` (its paths, comma-separated) and,
  for NVIDIA GPUs, `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` (their indexes).
- A start that finds fewer free than it asks for (the site's count was behind) fails with
  the reason and is tried again per its restart policy: never a shared device.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping

NVIDIA_GLOB = "/dev/nvidia[0-9]*"
RENDER_GLOB = "/dev/dri/renderD*"
# nvidia-smi answers in well under a second; a wedged driver must not hold up the start.
NVIDIA_SMI_TIMEOUT = 5.0


@dataclass(frozen=True)
class Device:
    kind: str
    path: str
    index: int | None = None  # an NVIDIA GPU's number (CUDA_VISIBLE_DEVICES)
    name: str = ""  # what the driver calls it, when it says


class DeviceError(Exception):
    """Fewer devices free than a workload asks for; the message says which."""


def found(configured: Mapping[str, tuple[str, ...]] = {}, root: str = "") -> list[Device]:
    """The devices of this node: those found under `root` (the real / by default), and the
    configured ones (a configured path that does not exist is left out)."""
    devices: list[Device] = []
    for path in sorted(glob.glob(root + NVIDIA_GLOB), key=_number):
        match = re.fullmatch(r".*/nvidia(\d+)", path)
        if match:
            devices.append(Device("gpu", path[len(root):], int(match.group(1))))
    for path in sorted(glob.glob(root + RENDER_GLOB), key=_number):
        devices.append(Device("render", path[len(root):]))
    for kind, paths in sorted(configured.items()):
        for path in paths:
            if os.path.exists(root + path):
                devices.append(Device(kind, path))
    return devices


def _number(path: str) -> int:
    digits = re.findall(r"\d+", os.path.basename(path))
    return int(digits[-1]) if digits else 0


def nvidia_names() -> dict[int, str]:
    """GPU index -> name from `nvidia-smi`, when it is installed and answers."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    names = {}
    for line in out.splitlines():
        index, _, name = line.partition(",")
        if index.strip().isdigit():
            names[int(index)] = name.strip()
    return names


def counts(devices: list[Device]) -> dict[str, int]:
    out: dict[str, int] = {}
    for device in devices:
        out[device.kind] = out.get(device.kind, 0) + 1
    return out


class DeviceSet:
    """Which allocation holds which of this node's devices."""

    def __init__(self, devices: list[Device]) -> None:
        self.devices = list(devices)
        self._held: dict[str, str] = {}  # device path -> alloc id

    def refresh(self, devices: list[Device]) -> None:
        """The devices found now (one unplugged stays held by whoever held it until released)."""
        self.devices = list(devices)

    def take(self, alloc_id: str, wanted: tuple[tuple[str, int], ...]) -> list[Device]:
        """What `alloc_id` holds of each kind it wants: what it held already, else free ones."""
        mine = [d for d in self.devices if self._held.get(d.path) == alloc_id]
        chosen: list[Device] = []
        for kind, count in wanted:
            have = [d for d in mine if d.kind == kind][:count]
            free = [d for d in self.devices if d.kind == kind and d.path not in self._held]
            if len(have) + len(free) < count:
                total = sum(1 for d in self.devices if d.kind == kind)
                raise DeviceError(f"needs {count} {kind}, {len(have) + len(free)} free of {total} on this node")
            chosen += have + free[: count - len(have)]
        for device in mine:
            if device not in chosen:
                del self._held[device.path]
        for device in chosen:
            self._held[device.path] = alloc_id
        return chosen

    def release(self, alloc_id: str) -> None:
        for path in [p for p, holder in self._held.items() if holder == alloc_id]:
            del self._held[path]

    def held_by(self, alloc_id: str) -> list[Device]:
        return [d for d in self.devices if self._held.get(d.path) == alloc_id]


def device_env(held: list[Device]) -> dict[str, str]:
    """What a workload is told of the devices it holds."""
    env: dict[str, str] = {}
    by_kind: dict[str, list[Device]] = {}
    for device in held:
        by_kind.setdefault(device.kind, []).append(device)
    for kind, devices in sorted(by_kind.items()):
        env[f"MESHD_DEVICE_{kind.upper().replace('-', '_')}"] = ",".join(d.path for d in devices)
    gpus = [str(d.index) for d in held if d.kind == "gpu" and d.index is not None]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env
