"""Packaging: the systemd unit, the default config and the .deb built from them."""

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

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNIT = PACKAGING / "meshd.service"
DEFAULT_CONFIG = PACKAGING / "meshd.toml"
BUILD_SCRIPT = PACKAGING / "build-deb.sh"
BUILD_TIMEOUT_S = 600  # building the wheel may fetch the build backend from the package index
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
    # `labels` and `peers` are documented under their repeatable spellings.
    missing -= {"labels", "peers"} if {"label", "peer"} <= documented else set()
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


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (Debian's dpkg package provides it)")
    out = tmp_path_factory.mktemp("dist")
    before = {p.name for p in ROOT.iterdir()}
    result = subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    created = {p.name for p in ROOT.iterdir()} - before
    assert not {n for n in created if n == "build" or n.endswith(".egg-info")}, "build output left in the tree"
    deb = out / f"meshd_{project_version()}_all.deb"
    assert result.stdout.strip() == str(deb)
    assert deb.is_file()
    return deb


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_deb_control_fields(built_deb: Path) -> None:
    assert dpkg_deb("-f", str(built_deb), "Package").strip() == "meshd"
    assert dpkg_deb("-f", str(built_deb), "Version").strip() == project_version()
    assert dpkg_deb("-f", str(built_deb), "Architecture").strip() == "all"
    depends = [d.strip() for d in dpkg_deb("-f", str(built_deb), "Depends").split(",")]
    assert depends == ["python3 (>= 3.11)", "python3-venv"]


def test_deb_file_list(built_deb: Path) -> None:
    entries = {}
    for line in dpkg_deb("-c", str(built_deb)).splitlines():
        path = line.split(None, 5)[5]
        name, _, target = path.partition(" -> ")
        entries[name.removeprefix(".")] = target
    assert entries["/etc/meshd/meshd.toml"] == ""
    assert entries["/lib/systemd/system/meshd.service"] == ""
    assert entries["/usr/bin/meshd"] == "/opt/meshd/bin/meshd"
    assert entries["/usr/bin/meshctl"] == "/opt/meshd/bin/meshctl"
    wheels = [p for p in entries if re.fullmatch(rf"/usr/share/meshd/meshd-{re.escape(project_version())}-py3-none-any\.whl", p)]
    assert len(wheels) == 1


def test_deb_ships_the_packaging_files_unchanged(built_deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "etc/meshd/meshd.toml").read_text() == DEFAULT_CONFIG.read_text()
    assert (tmp_path / "lib/systemd/system/meshd.service").read_text() == UNIT.read_text()


def test_deb_maintainer_scripts(built_deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "DEBIAN"
    subprocess.run(["dpkg-deb", "-e", str(built_deb), str(control)], check=True, timeout=60)
    assert (control / "conffiles").read_text().split() == ["/etc/meshd/meshd.toml"]
    wheel = next(p.split(None, 5)[5] for p in dpkg_deb("-c", str(built_deb)).splitlines() if p.endswith(".whl"))
    postinst = (control / "postinst").read_text()
    assert "python3 -m venv /opt/meshd" in postinst
    assert "/opt/meshd/bin/pip install" in postinst and wheel.removeprefix(".") in postinst
    for script in ("postinst", "prerm", "postrm"):
        assert (control / script).stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["sh", "-n", str(control / script)], check=True, timeout=60)
    # An upgrade runs the old postrm with "upgrade": it must not delete the new venv.
    postrm = (control / "postrm").read_text()
    assert re.search(r"remove\|purge\)\s+rm -rf /opt/meshd", postrm)


def test_ci_runs_exactly_the_test_command_the_readme_gives() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == test_command
