"""`meshd digest` (meshd.io.builddigest): the digest of a build read from a directory, a real
wheel and a real .deb equals what the installed attester measures for the same code; bad and
hostile inputs get one line and nothing else."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import attestation
import crdt
import meshd
from meshd.io.attester import package_digest
from meshd.io.builddigest import DigestError, digest_build

PACKAGES = (meshd, attestation, crdt)


def _copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        src = Path(package.__file__).parent
        shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src")
    root = Path(meshd.__file__).parent.parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    _copy_tree(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(src)], check=True)
    [built] = out.glob("meshd-*.whl")
    return built


def test_the_installed_build_and_its_source_tree_digest_alike(tmp_path):
    installed = digest_build(None)
    assert installed.digest == package_digest() and installed.version == meshd.__version__
    tree = digest_build(str(_copy_tree(tmp_path / "src")))
    assert (tree.digest, tree.version, tree.source) == (installed.digest, installed.version, "directory")


def test_a_wheel_digests_like_the_installed_code(wheel):
    built = digest_build(str(wheel))
    assert (built.digest, built.source) == (package_digest(), "wheel")


def _deb(tmp_path: Path, files: dict[str, bytes], compress: str = "xz", member: str | None = None) -> Path:
    """A .deb (ar) with a data.tar.<compress> of `files`, written by hand."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode=f"w:{compress}" if compress else "w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    blob = data.getvalue()
    name = member or ("data.tar." + compress if compress else "data.tar")

    def ar_member(name: str, body: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        return header + body + (b"\n" if len(body) % 2 else b"")
    path = tmp_path / "meshd.deb"
    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"")
                     + ar_member(name, blob))
    return path


def _site_packages_files(prefix: str) -> dict[str, bytes]:
    files = {}
    for package in PACKAGES:
        src = Path(package.__file__).parent
        for path in src.rglob("*.py"):
            if "__pycache__" not in path.parts:
                files[f"{prefix}/{src.name}/{path.relative_to(src).as_posix()}"] = path.read_bytes()
    return files


def test_a_deb_digests_like_the_installed_code(tmp_path):
    files = _site_packages_files("./opt/meshd/lib/python3.11/site-packages")
    files["./usr/share/meshd/DIGEST"] = b"0.1.0 x\n"  # not measured
    built = digest_build(str(_deb(tmp_path, files)))
    assert (built.digest, built.version, built.source) == (package_digest(), meshd.__version__, "deb")


def test_a_real_deb_from_dpkg_deb_reads_too(tmp_path):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    stage = tmp_path / "stage"
    for name, content in _site_packages_files("opt/meshd/lib/python3.11/site-packages").items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_bytes(content)
    (stage / "DEBIAN").mkdir()
    (stage / "DEBIAN" / "control").write_text("Package: meshd\nVersion: 0.1.0\nArchitecture: all\n"
                                              "Maintainer: m <m@example.org>\nDescription: d\n")
    subprocess.run(["dpkg-deb", "-Zxz", "--root-owner-group", "--build", str(stage), str(tmp_path / "m.deb")],
                   check=True, capture_output=True)
    assert digest_build(str(tmp_path / "m.deb")).digest == package_digest()


def test_a_changed_file_changes_the_digest(tmp_path):
    tree = _copy_tree(tmp_path / "src")
    (tree / "crdt" / "schema.py").write_text((tree / "crdt" / "schema.py").read_text() + "\n# changed\n")
    assert digest_build(str(tree)).digest != package_digest()


def _zip(tmp_path: Path, files: dict[str, bytes]) -> Path:
    path = tmp_path / "meshd-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda t: t / "nothing-here", "no such file or directory"),
    (lambda t: (t / "x.txt").write_text("hi") and t / "x.txt", "not a .deb, a wheel or a directory"),
    (lambda t: t, "holds no meshd, attestation, crdt package"),
    (lambda t: _zip(t, {"meshd/__init__.py": b'__version__ = "0.1.0"\n'}), "holds no attestation, crdt package"),
    (lambda t: _zip(t, {"meshd/../../evil.py": b"x", "meshd/__init__.py": b""}), "leaves the archive"),
    (lambda t: (t / "bad.whl").write_bytes(b"PK\x03\x04garbage") and t / "bad.whl", "not a readable wheel"),
    (lambda t: _deb(t, {"/opt/meshd/lib/site-packages/meshd/__init__.py": b""}), "leaves the archive"),
    (lambda t: _deb(t, {"./x": b"x"}, member="data.tar.zst"), "zstd"),
    (lambda t: (t / "t.deb").write_bytes(b"!<arch>\n" + b"data.tar.xz     " + b"0" * 32 + b"9" * 10 + b"`\n")
     and t / "t.deb", "larger than"),
    (lambda t: (t / "t.deb").write_bytes(b"!<arch>\ndebian-binary") and t / "t.deb", "without a data archive"),
    (lambda t: _deb(t, {f"./s/site-packages/{k.split('site-packages/')[1]}": v for k, v in
                        _site_packages_files("./site-packages").items()} | {"./s/site-packages/meshd/__init__.py": b""}),
     "names no __version__"),
])
def test_bad_and_hostile_builds_are_refused_with_a_reason(tmp_path, make, reason):
    with pytest.raises(DigestError, match=reason):
        digest_build(str(make(tmp_path)))


def test_the_command_prints_a_line_or_one_error(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "meshd.cli.meshd_main", "digest", "--json"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and f'"digest": "{package_digest()}"' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "meshd.cli.meshd_main", "digest", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
