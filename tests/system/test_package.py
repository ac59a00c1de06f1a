"""The .deb installs and runs with no network: built by packaging/build-deb.sh, installed by
dpkg into a fresh root (`dpkg --root`, maintainer scripts run chrootless), then run from a
mount and network namespace (`unshare -n -m`) that has no route anywhere and sees that
root's /opt/meshd at /opt/meshd (a tmpfs over /opt, so this machine's /opt is untouched).
Nothing of this machine's Python environment is visible to it: the installed commands run
Debian's interpreter in isolated mode on the package's own virtual environment.

Also: the arm64 package, built on any machine from the index's arm64 wheels, holds arm64
code only, and digests like the native one (the same meshd code).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.debpkg import build, native_arch, project_version

pytestmark = pytest.mark.system

PYVER = f"python{sys.version_info[0]}.{sys.version_info[1]}"
INTERPRETER = Path("/usr/bin") / PYVER  # what the package's Depends: python3.X provides
DEMO_TIMEOUT = 120  # three daemons found, join and run the app for 5 s, then stop
ELF_MACHINES = {62: "amd64", 183: "arm64"}  # e_machine: EM_X86_64, EM_AARCH64


def require_root_namespaces() -> None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    for tool in ("unshare", "dpkg", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not INTERPRETER.is_file():
        missing.append(f"{INTERPRETER} (Debian's {PYVER})")
    if missing:
        message = f"installing the package into a fresh root needs {', '.join(missing)}"
        if os.environ.get("MESHD_REQUIRE_LAB") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def installed(native_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root_namespaces()
    root = tmp_path_factory.mktemp("root")
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "usr/bin"):
        (root / d).mkdir(parents=True)
    (root / "var/lib/dpkg/status").touch()
    # The fresh root has no packages: the interpreter the python3.X package would install is
    # this machine's (the postinst checks that it is there; the dependency itself is forced).
    (root / "usr/bin" / PYVER).symlink_to(INTERPRETER)
    result = subprocess.run(["dpkg", f"--root={root}", "--force-depends", "--force-script-chrootless",
                             "--log=/dev/null", "-i", str(native_deb)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    status = subprocess.run(["dpkg-query", f"--root={root}", "-W", "-f=${Status} ${Version}", "meshd"],
                            capture_output=True, text=True, timeout=60)
    assert status.stdout == f"install ok installed {project_version()}"
    return root


def offline(root: Path, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`command` (sh) in new mount and network namespaces: only loopback, and `root`'s
    /opt/meshd at /opt/meshd; with no environment but PATH."""
    script = ("mkdir -p /opt && mount -t tmpfs none /opt && mkdir /opt/meshd && "
              f"mount --bind {root}/opt/meshd /opt/meshd && ip link set lo up && {command}")
    return subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(root)})


def test_the_namespace_has_no_network(installed: Path) -> None:
    routes = offline(installed, "ip -4 route; ip -6 route; ip -o link")
    assert routes.returncode == 0, routes.stderr
    lines = routes.stdout.splitlines()
    assert len(lines) == 1 and ": lo:" in lines[0], lines  # no route at all, and only loopback


def test_installed_meshd_runs_from_its_own_environment(installed: Path) -> None:
    result = offline(installed, f"{installed}/usr/bin/meshd --version && {installed}/usr/bin/meshctl --help"
                                " >/dev/null && /opt/meshd/bin/python -I -c "
                                "'import sys, meshd, trio, cryptography; print(sys.prefix, meshd.__file__)'")
    assert result.returncode == 0, result.stderr
    version, where = result.stdout.splitlines()
    assert version == f"meshd {project_version()}"
    prefix, module = where.split()
    assert prefix == "/opt/meshd" and module.startswith(f"/opt/meshd/lib/{PYVER}/site-packages/meshd/")


def test_installed_demo_runs_offline(installed: Path) -> None:
    result = offline(installed, f"{installed}/usr/bin/meshd demo --duration 5", timeout=DEMO_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "joined by mDNS" in result.stdout
    assert "hello-edge  1        running  3/3" in result.stdout
    assert "hello from" in result.stdout  # a replica's own output


def test_shipped_digest_is_what_meshd_digest_reads_and_what_the_installed_node_measures(
        installed: Path, native_deb: Path) -> None:
    shipped = (installed / "usr/share/meshd/DIGEST").read_text()
    assert shipped.endswith("\n") and len(shipped.strip()) == 64
    read = subprocess.run([sys.executable, "-m", "meshd.cli.meshd_main", "digest", "--json", str(native_deb)],
                          capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    measured = offline(installed, f"{installed}/usr/bin/meshd digest --json")
    assert measured.returncode == 0, measured.stderr
    assert json.loads(read.stdout) == {"version": project_version(), "digest": shipped.strip(), "source": "deb"}
    assert json.loads(measured.stdout) == {"version": project_version(), "digest": shipped.strip(),
                                           "source": "installed"}


def test_removing_the_package_leaves_no_environment(installed: Path, native_deb: Path, tmp_path: Path) -> None:
    # On a copy, so the other tests keep theirs whatever the order.
    root = tmp_path / "root"
    shutil.copytree(installed, root, symlinks=True)
    result = subprocess.run(["dpkg", f"--root={root}", "--force-depends", "--force-script-chrootless",
                             "--log=/dev/null", "--purge", "meshd"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (root / "opt/meshd").exists() and not (root / "usr/bin/meshd").is_symlink()
    assert not (root / "etc/meshd").exists()


def elf_machine(data: bytes) -> str:
    assert data[:4] == b"\x7fELF"
    return ELF_MACHINES.get(int.from_bytes(data[18:20], "little"), "other")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
def test_arm64_package_builds_here_with_arm64_code_only(native_deb: Path, tmp_path: Path) -> None:
    other = "arm64" if native_arch() != "arm64" else "amd64"
    deb = build(tmp_path / "dist", arch=other)
    assert subprocess.run(["dpkg-deb", "-f", str(deb), "Architecture"], capture_output=True, text=True,
                          check=True).stdout.strip() == other
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=120)
    libraries = [p for p in tree.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    assert len(libraries) >= 5  # cffi, cryptography, psutil, pycrdt, zeroconf at least
    assert {elf_machine(p.read_bytes()[:20]) for p in libraries} == {other}
    digests = [json.loads(subprocess.run([sys.executable, "-m", "meshd.cli.meshd_main", "digest", "--json", str(d)],
                                         capture_output=True, text=True, check=True).stdout)["digest"]
               for d in (deb, native_deb)]
    assert digests[0] == digests[1] == (tree / "usr/share/meshd/DIGEST").read_text().strip()
