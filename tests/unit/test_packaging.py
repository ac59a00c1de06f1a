"""Packaging: the systemd unit, the default config, the lock and the .deb built from them
(installing it with no network: tests/system/test_package.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshd import exitcodes
from meshd.config import OPTION_NAMES, NodeConfig, resolve_config
from meshd.io.sdnotify import PING_FRACTION
from meshd.io.watchdog import CHECK_PERIOD, DEFAULT_STALL_LIMIT, FEED_PERIOD
from meshd.node.joining import JOIN_TIMEOUT

from tests.debpkg import (BUILD_SCRIPT, LOCK, PACKAGING, ROOT, dpkg_deb, locked, native_arch, normalize,
                          project_version)

UNIT = PACKAGING / "meshd.service"
DEFAULT_CONFIG = PACKAGING / "meshd.toml"
COMMENTED_OPTION = re.compile(r"^# ?([a-z][a-z_-]*) = (.*)$")


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section] headers, Key=Value lines (keys may repeat), # comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_file_runs_meshd_as_a_notify_service() -> None:
    service = unit_sections(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/bin/meshd run --config /etc/meshd/meshd.toml"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillMode"] == ["mixed"]
    assert service["StateDirectory"] == ["meshd"]


def test_unit_watchdog_lets_the_daemons_own_loop_watchdog_act_first() -> None:
    service = unit_sections(UNIT.read_text())["Service"]
    assert service["NotifyAccess"] == ["main"]  # pings come from the daemon, never a workload
    (timeout,) = service["WatchdogSec"]
    seconds = float(timeout.removesuffix("s"))
    # A loop that wedges just before a ping was due is killed by systemd this soon; the
    # daemon's own watchdog ends it within its limit, a check and a feed period.
    assert seconds * (1 - PING_FRACTION) > DEFAULT_STALL_LIMIT + CHECK_PERIOD + FEED_PERIOD
    # Until READY=1 only the start timeout applies: a join gives up (status 69) before it.
    assert float(service["TimeoutStartSec"][0].removesuffix("s")) > JOIN_TIMEOUT


def test_unit_file_stops_restarting_on_what_a_restart_cannot_fix() -> None:
    service = unit_sections(UNIT.read_text())["Service"]
    prevented = {int(status) for status in service["RestartPreventExitStatus"][0].split()}
    assert prevented == {exitcodes.EXIT_CONFIG, exitcodes.EXIT_REVOKED, exitcodes.EXIT_REFUSED}


def test_unit_file_keeps_devices_for_workloads_and_attestation() -> None:
    service = unit_sections(UNIT.read_text())["Service"]
    for blocks_devices in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert blocks_devices not in service, f"{blocks_devices} would hide /dev/tpmrm0 and serial ports"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_has_no_unknown_directives(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists; point it at one that does.
    unit = tmp_path / "meshd.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/meshd ", "ExecStart=/bin/true "))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "meshd.service" in line]
    assert complaints == [] and result.returncode == 0


# `systemd-analyze security` weighs what a unit leaves open, from 0 (nothing) to 10; the
# unit was 8.0 (EXPOSED) before its hardening and is 5.4 (MEDIUM) with systemd 252. What it
# leaves open it does on purpose (devices, address families, namespaces for workloads; root).
MAX_EXPOSURE = 6.0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_exposure_stays_medium(tmp_path: Path) -> None:
    unit = tmp_path / "meshd.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/meshd ", "ExecStart=/bin/true "))
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    if "--offline" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd 252 added it)")
    found = re.search(r"Overall exposure level for meshd\.service: (\d+\.\d)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE


def test_unit_file_hardening_directives() -> None:
    text = UNIT.read_text()
    service = unit_sections(text)["Service"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("Delegate", "yes"), ("StateDirectory", "meshd"),
                       ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("RestrictSUIDSGID", "yes"), ("UMask", "0077")):
        assert service.get(key) == [value], key
    # systemd 252's ProtectControlGroups=yes makes the delegated cgroup subtree read-only too
    assert "ProtectControlGroups" not in service
    kept = {cap for line in service["CapabilityBoundingSet"] for cap in line.split()}
    assert {"CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_CHOWN"} <= kept
    assert not kept & {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_PTRACE", "CAP_SYS_BOOT"}
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert all(cap in comments for cap in kept), "every capability kept says why in a comment"
    assert service["AmbientCapabilities"] == [""]


SET_OPTION = re.compile(r"^([a-z][a-z_-]*) = (.*)$")


def options_set(text: str) -> set[str]:
    """The keys a config file sets for real (uncommented)."""
    return {m.group(1) for line in text.splitlines() if (m := SET_OPTION.match(line))}


def test_default_config_is_the_built_in_defaults_but_founds_no_mesh() -> None:
    """A fresh install must not found a mesh by accident: the one key the packaged config sets
    is bootstrap = "join" (refused without a token: tests/system/test_startup.py)."""
    assert options_set(DEFAULT_CONFIG.read_text()) == {"bootstrap"}
    cfg = resolve_config({}, DEFAULT_CONFIG.read_text(), {}, "testhost")
    assert cfg == NodeConfig(data_dir="/var/lib/meshd", name="testhost", bootstrap="join",
                             given=frozenset({"bootstrap"}))


def test_default_config_documents_every_option() -> None:
    text = DEFAULT_CONFIG.read_text()
    documented = {m.group(1) for line in text.splitlines() if (m := COMMENTED_OPTION.match(line))}
    documented |= options_set(text)
    missing = {name for name in OPTION_NAMES if name not in documented}
    # `labels`, `peers` and `devices` are documented under their repeatable spellings.
    missing -= {"labels", "peers", "devices"} if {"label", "peer", "device"} <= documented else set()
    assert missing == set()


def test_default_config_examples_are_valid_and_defaults_are_true() -> None:
    text = DEFAULT_CONFIG.read_text()
    really_set = options_set(text)  # their commented alternatives stay comments
    uncommented = "\n".join(m.group(1) + " = " + m.group(2)
                            if (m := COMMENTED_OPTION.match(line)) and m.group(1) not in really_set else line
                            for line in text.splitlines())
    cfg = resolve_config({}, uncommented, {}, "testhost")
    assert cfg.bootstrap == "join" and cfg.join == "PASTE-TOKEN-HERE"
    defaults = NodeConfig(data_dir="/var/lib/meshd", name="testhost")
    for option in ("data_dir", "site", "listen", "admin_socket", "mdns", "heartbeat_interval", "lease",
                   "raft_min_timeout", "raft_max_timeout", "log_max_bytes", "reattest_interval",
                   "log_keep"):
        assert getattr(cfg, option) == getattr(defaults, option), option


def test_deb_control_fields(native_deb: Path) -> None:
    assert dpkg_deb("-f", str(native_deb), "Package").strip() == "meshd"
    assert dpkg_deb("-f", str(native_deb), "Version").strip() == project_version()
    # The compiled dependencies (cryptography, pycrdt, psutil, ...) are this machine's.
    assert dpkg_deb("-f", str(native_deb), "Architecture").strip() == native_arch()
    depends = [d.strip() for d in dpkg_deb("-f", str(native_deb), "Depends").split(",")]
    assert depends[0] == f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert re.fullmatch(r"libc6 \(>= 2\.\d+\)", depends[1]) and len(depends) == 2


def deb_entries(deb: Path) -> dict[str, str]:
    entries = {}
    for line in dpkg_deb("-c", str(deb)).splitlines():
        path = line.split(None, 5)[5]
        name, _, target = path.partition(" -> ")
        entries[name.removeprefix(".")] = target
    return entries


def test_deb_file_list(native_deb: Path) -> None:
    entries = deb_entries(native_deb)
    pyver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert entries["/etc/meshd/meshd.toml"] == ""
    assert entries["/lib/systemd/system/meshd.service"] == ""
    assert entries["/usr/bin/meshd"] == "/opt/meshd/bin/meshd"
    assert entries["/usr/bin/meshctl"] == "/opt/meshd/bin/meshctl"
    assert entries["/usr/share/meshd/DIGEST"] == ""
    # The environment points at the device's interpreter, not the build machine's.
    assert entries[f"/opt/meshd/bin/{pyver}"] == f"/usr/bin/{pyver}"
    site = f"/opt/meshd/lib/{pyver}/site-packages"
    for package in ("meshd", "attestation", "crdt", "trio", "cryptography", "pycrdt", "psutil", "pysyncobj",
                    "zeroconf"):
        assert f"{site}/{package}/__init__.py" in entries, package
    # Compiled at build time (the installed tree is read-only to the daemon).
    assert any(p.startswith(f"{site}/meshd/__pycache__/") and p.endswith(".pyc") for p in entries)
    assert not [p for p in entries if p.endswith(".whl")], "no wheel left to install at configure time"


def test_deb_carries_exactly_the_locked_dependencies(native_deb: Path, tmp_path: Path) -> None:
    """What the package holds is the lock, the lock is the whole closure of meshd's
    requirements, and every requirement is met by the version it has."""
    from importlib.metadata import PathDistribution
    from packaging.requirements import Requirement

    subprocess.run(["dpkg-deb", "-x", str(native_deb), str(tmp_path)], check=True, timeout=120)
    (site,) = (tmp_path / "opt/meshd/lib").glob("python3.*/site-packages")
    dists = {normalize(d.metadata["Name"]): d for d in map(PathDistribution, site.glob("*.dist-info"))}
    have = {name: d.version for name, d in dists.items()}
    assert have.pop("meshd") == project_version()
    assert have == locked()

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed, todo = set(), [Requirement(r) for r in pyproject]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = normalize(req.name)
        assert name in have, f"{req} is needed but not in the package"
        assert req.specifier.contains(have[name], prereleases=True), f"{req} is not met by {have[name]}"
        if name not in needed:
            needed.add(name)
            todo += [Requirement(r) for r in dists[name].requires or []]
    assert needed == set(have), f"locked but never needed: {set(have) - needed}"


def test_deb_ships_the_packaging_files_unchanged(native_deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(native_deb), str(tmp_path)], check=True, timeout=120)
    assert (tmp_path / "etc/meshd/meshd.toml").read_text() == DEFAULT_CONFIG.read_text()
    assert (tmp_path / "lib/systemd/system/meshd.service").read_text() == UNIT.read_text()
    assert (tmp_path / "usr/share/meshd/requirements.lock").read_text() == LOCK.read_text()
    for command in ("meshd", "meshctl"):
        first = (tmp_path / "opt/meshd/bin" / command).read_text().splitlines()[0]
        assert first == f"#!/opt/meshd/bin/python{sys.version_info[0]}.{sys.version_info[1]} -I"


def test_deb_maintainer_scripts_install_nothing_from_the_network(native_deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(native_deb), str(control)], check=True, timeout=60)
    assert (control / "conffiles").read_text().split() == ["/etc/meshd/meshd.toml"]
    for script in ("postinst", "prerm", "postrm"):
        text = (control / script).read_text()
        assert "pip" not in text and "venv" not in text, script
        assert (control / script).stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["sh", "-n", str(control / script)], check=True, timeout=60)
    # An upgrade runs the old postrm with "upgrade": it must not delete the new files.
    postrm = (control / "postrm").read_text()
    assert re.search(r"remove\|purge\)\s+#[^\n]*\n\s+rm -rf \"\$\{DPKG_ROOT:-\}/opt/meshd\"", postrm)


def test_build_refuses_an_architecture_it_cannot_cross_build(tmp_path: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    other = "riscv64" if native_arch() != "riscv64" else "armhf"
    result = subprocess.run(["bash", str(BUILD_SCRIPT), "--arch", other, str(tmp_path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 1 and list(tmp_path.iterdir()) == []
    assert result.stderr.startswith(f"error: cannot build for {other} on {native_arch()}")


def test_ci_runs_exactly_the_test_command_the_readme_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == test_command
