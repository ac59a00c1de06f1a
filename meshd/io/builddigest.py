"""The reference digest of a meshd build before it is installed (`meshd digest`): read the
measured packages' files from a .deb, a wheel or a directory (a source tree or a
site-packages), and digest them exactly as the installed node's attester will
(attestation.measure.digest_of), so an operator allows an upgrade (`meshctl policy allow`)
before installing it, offline.

Invariants:
- What is read is bounded (a reason next to each limit); a member whose name leaves its
  archive (absolute, `..`) makes the whole archive refused: a hostile archive gets a
  one-line reason, never a traceback, and nothing is written anywhere.
- A build without all of the measured packages is refused, never digested in part.
- Standard library only (beside attestation.measure): the package build runs it on a
  site-packages of another architecture, whose compiled dependencies cannot be imported.
"""

from __future__ import annotations

import io
import lzma
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from attestation.measure import MEASURED_NAMES, digest_of, measured_file

# meshd, attestation and crdt are a few hundred KiB of Python; a whole .deb with its venv is
# tens of MiB. These bounds are far beyond a real build and stop a crafted archive.
MAX_ARCHIVE = 512 * 1024 * 1024  # bytes of a .deb's data member read into memory
MAX_FILE = 16 * 1024 * 1024  # one measured .py file
MAX_MEASURED = 256 * 1024 * 1024  # all measured files together (decompressed)
MAX_MEMBERS = 200_000  # entries looked at in one archive
VERSION_RE = re.compile(r'''^__version__\s*=\s*["']([0-9][0-9A-Za-z.+-]{0,31})["']''', re.MULTILINE)


def measure_files(roots: list[Path]) -> str:
    """The digest of the packages rooted at `roots` (directories named after them)."""
    files = []
    for root in roots:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts
            if measured_file(parts) and path.is_file():
                files.append((root.name, parts, path.read_bytes()))
    return digest_of(files)


class DigestError(Exception):
    """A build that cannot be digested, with the reason the CLI shows."""


@dataclass(frozen=True)
class BuildDigest:
    version: str
    digest: str
    source: str  # what was read: "deb", "wheel", "directory" or "installed"

    def to_plain(self) -> dict:
        return {"version": self.version, "digest": self.digest, "source": self.source}


def digest_build(path: str | None) -> BuildDigest:
    """The digest of the build at `path` (None: the installed one)."""
    if path is None:
        from meshd import __version__
        from meshd.io.attester import package_digest
        return BuildDigest(__version__, package_digest(), "installed")
    target = Path(path)
    if target.is_dir():
        return _from_directory(target)
    if not target.is_file():
        raise DigestError(f"{path}: no such file or directory")
    try:
        with target.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DigestError(f"{path}: cannot read it ({e.strerror})") from None
    if head == b"!<arch>\n":
        return _from_deb(target)
    if head[:4] == b"PK\x03\x04":
        return _from_wheel(target)
    raise DigestError(f"{path}: not a .deb, a wheel or a directory")


def _from_directory(root: Path) -> BuildDigest:
    """A source tree or site-packages: the measured packages are its subdirectories."""
    missing = [name for name in MEASURED_NAMES if not (root / name / "__init__.py").is_file()]
    if missing:
        raise DigestError(f"{root}: holds no {', '.join(missing)} package (give a source tree, a site-packages "
                          "directory, a wheel or a .deb)")
    init = (root / "meshd" / "__init__.py").read_bytes()
    return BuildDigest(_version(init, str(root)), measure_files([root / name for name in MEASURED_NAMES]),
                       "directory")


def _from_wheel(path: Path) -> BuildDigest:
    try:
        with zipfile.ZipFile(path) as wheel:
            infos = wheel.infolist()
            if len(infos) > MAX_MEMBERS:
                raise DigestError(f"{path}: more than {MAX_MEMBERS} entries")
            files = _Collector(str(path))
            for info in infos:
                if info.is_dir():
                    continue
                parts = _safe_parts(info.filename, str(path))
                if files.wants(parts):
                    if info.file_size > MAX_FILE:
                        raise DigestError(f"{path}: {info.filename} is larger than {MAX_FILE} bytes")
                    files.add(parts, wheel.read(info))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DigestError(f"{path}: not a readable wheel ({e})") from None
    return files.result("wheel")


def _from_deb(path: Path) -> BuildDigest:
    data, name = _deb_data_member(path)
    if name.endswith(".xz"):
        mode = "r:xz"
    elif name.endswith(".gz"):
        mode = "r:gz"
    elif name == "data.tar":
        mode = "r:"
    else:
        raise DigestError(f"{path}: its {name} is not xz, gzip or plain (a zstd .deb: run "
                          "`dpkg-deb -x PACKAGE DIR` and give DIR/opt/meshd/lib/python3.*/site-packages)")
    files = _Collector(str(path))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
            for count, member in enumerate(tar):
                if count >= MAX_MEMBERS:
                    raise DigestError(f"{path}: more than {MAX_MEMBERS} entries")
                if not member.isfile():
                    continue
                parts = _safe_parts(member.name, str(path))
                # Inside the package, the measured packages sit in a site-packages directory.
                if "site-packages" not in parts:
                    continue
                inner = parts[parts.index("site-packages") + 1:]
                if files.wants(inner):
                    if member.size > MAX_FILE:
                        raise DigestError(f"{path}: {member.name} is larger than {MAX_FILE} bytes")
                    extracted = tar.extractfile(member)
                    if extracted is None:
                        continue
                    files.add(inner, extracted.read(MAX_FILE + 1))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise DigestError(f"{path}: its data archive is damaged ({e})") from None
    return files.result("deb")


def _deb_data_member(path: Path) -> tuple[bytes, str]:
    """The data.tar.* member of a .deb (an ar archive), read whole (bounded)."""
    try:
        with path.open("rb") as f:
            f.read(8)
            while True:
                header = f.read(60)
                if len(header) < 60:
                    raise DigestError(f"{path}: a .deb without a data archive")
                name = header[:16].decode("ascii", "replace").strip().rstrip("/")
                try:
                    size = int(header[48:58].decode("ascii").strip())
                except ValueError:
                    raise DigestError(f"{path}: a damaged .deb (member header)") from None
                if name.startswith("data.tar"):
                    if size > MAX_ARCHIVE:
                        raise DigestError(f"{path}: its data archive is larger than {MAX_ARCHIVE} bytes")
                    data = f.read(size)
                    if len(data) != size:
                        raise DigestError(f"{path}: a truncated .deb")
                    return data, name
                f.seek(size + (size & 1), io.SEEK_CUR)  # members are 2-byte aligned
    except OSError as e:
        raise DigestError(f"{path}: cannot read it ({e.strerror})") from None


def _safe_parts(name: str, where: str) -> tuple[str, ...]:
    pure = PurePosixPath(name)
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if pure.is_absolute() or ".." in parts:
        raise DigestError(f"{where}: an entry leaves the archive ({name[:80]!r}): refusing a hostile archive")
    return parts


class _Collector:
    """The measured files found in an archive, bounded in total."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.files: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self.size = 0

    def wants(self, parts: tuple[str, ...]) -> bool:
        return len(parts) >= 2 and parts[0] in MEASURED_NAMES and measured_file(parts[1:])

    def add(self, parts: tuple[str, ...], data: bytes) -> None:
        if len(data) > MAX_FILE:
            raise DigestError(f"{self.where}: {'/'.join(parts)} is larger than {MAX_FILE} bytes")
        self.size += len(data)
        if self.size > MAX_MEASURED:
            raise DigestError(f"{self.where}: more than {MAX_MEASURED} bytes of measured code")
        self.files[(parts[0], parts[1:])] = data

    def result(self, source: str) -> BuildDigest:
        missing = [name for name in MEASURED_NAMES if (name, ("__init__.py",)) not in self.files]
        if missing:
            raise DigestError(f"{self.where}: holds no {', '.join(missing)} package")
        version = _version(self.files[("meshd", ("__init__.py",))], self.where)
        return BuildDigest(version, digest_of((p, parts, data) for (p, parts), data in self.files.items()), source)


def _version(init: bytes, where: str) -> str:
    match = VERSION_RE.search(init.decode("utf-8", "replace"))
    if match is None:
        raise DigestError(f"{where}: its meshd/__init__.py names no __version__")
    return match.group(1)
