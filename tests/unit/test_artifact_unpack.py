"""meshd.artifacts.unpack: hostile archives refused, good ones unpacked whole and read-only."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.artifacts import unpack as unpack_module
from meshd.artifacts.unpack import CHUNK, UnpackError, UnpackResult, archive_format, unpack

MB = 1024 * 1024


# --- building archives -----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # file, dir, symlink, hardlink, or a tarfile type (special)
    name: str
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    pax: dict | None = None


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    return Entry("file", name, data=data, mode=mode)


def dir_(name: str) -> Entry:
    return Entry("dir", name, mode=0o755)


def symlink(name: str, target: str) -> Entry:
    return Entry("symlink", name, target=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry("hardlink", name, target=target)


def special(name: str, tar_type: bytes) -> Entry:
    return Entry("special", name, target=tar_type.decode())


def build_tar(path: Path, entries: list[Entry], *, gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            if e.pax:
                info.pax_headers = dict(e.pax)
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
                continue
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.target
            else:
                info.type = e.target.encode()
            tar.addfile(info)
    return path


def build_zip(path: Path, entries: list[Entry]) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are on purpose
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for e in entries:
                name = e.name + "/" if e.kind == "dir" and not e.name.endswith("/") else e.name
                info = zipfile.ZipInfo(name)
                info.create_system = 3
                info.compress_type = zipfile.ZIP_DEFLATED
                if e.kind == "dir":
                    info.external_attr = (stat.S_IFDIR | e.mode) << 16
                    zf.writestr(info, b"")
                elif e.kind == "symlink":
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, e.target.encode())
                elif e.kind == "special":
                    info.external_attr = (int(e.target) | 0o644) << 16
                    zf.writestr(info, b"")
                else:
                    info.external_attr = (stat.S_IFREG | e.mode) << 16
                    zf.writestr(info, e.data)
    return path


def build(path: Path, fmt: str, entries: list[Entry]) -> Path:
    if fmt == "zip":
        return build_zip(path, entries)
    return build_tar(path, entries, gz=fmt == "tar.gz")


@pytest.fixture
def box(tmp_path: Path):
    """The only directory a test writes in: whatever escaped it would land in tmp_path."""
    b = tmp_path / "box"
    b.mkdir()
    yield b
    assert os.listdir(tmp_path) == ["box"]


def refused(archive: Path, match: str, *, max_bytes: int = 10 * MB, **limits) -> str:
    """Unpack must refuse with `match`, leaving neither the target nor a temporary dir."""
    target = archive.parent / "out"
    with pytest.raises(UnpackError, match=match) as caught:
        unpack(archive, target, max_bytes=max_bytes, **limits)
    assert not os.path.lexists(target)
    assert os.listdir(archive.parent) == [archive.name]
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600
    return message


def modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(base, name)
            st_ = os.lstat(path)
            if not stat.S_ISLNK(st_.st_mode):
                found[str(path.relative_to(root))] = stat.S_IMODE(st_.st_mode)
    return found


# --- good archives ---------------------------------------------------------------------

GOOD = [
    dir_("bin"),
    file("bin/run", b"#!/bin/sh\necho hi\n", mode=0o755),
    file("share/doc/readme.txt", b"read me\n", mode=0o666),
    file("model/weights.bin", os.urandom(3 * CHUNK + 17)),
    file("setuid", b"x", mode=0o4755),
    symlink("latest", "model/weights.bin"),
    symlink("share/doc/bin", "../../bin"),
]


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "zip"])
def test_a_good_archive_unpacks_whole_and_read_only(box: Path, fmt: str):
    archive = build(box / f"a.{fmt}", fmt, GOOD)
    target = box / "out"
    result = unpack(archive, target, max_bytes=MB)
    assert result == UnpackResult(files=4, bytes=sum(len(e.data) for e in GOOD))
    assert sorted(os.listdir(box)) == [archive.name, "out"]
    assert (target / "bin" / "run").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (target / "model" / "weights.bin").read_bytes() == GOOD[3].data
    assert os.readlink(target / "latest") == "model/weights.bin"
    assert (target / "latest").read_bytes() == GOOD[3].data
    assert os.readlink(target / "share" / "doc" / "bin") == "../../bin"
    assert (target / "share" / "doc" / "bin" / "run").is_file()
    assert modes(target) == {
        ".": 0o555, "bin": 0o555, "share": 0o555, "share/doc": 0o555, "model": 0o555,
        "bin/run": 0o555, "share/doc/readme.txt": 0o444, "model/weights.bin": 0o444, "setuid": 0o555,
    }


def test_a_tar_made_of_a_directory_with_its_dot_entries_unpacks(box: Path, tmp_path: Path):
    src = Path(tempfile.mkdtemp(dir=box))
    (src / "lib").mkdir()
    (src / "lib" / "a.py").write_text("print(1)\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "run.sh", 0o700)
    archive = box / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname=".")
    os.remove(src / "lib" / "a.py")
    os.rmdir(src / "lib")
    os.remove(src / "run.sh")
    os.rmdir(src)
    target = box / "out"
    assert unpack(archive, target, max_bytes=MB) == UnpackResult(files=2, bytes=19)
    assert (target / "lib" / "a.py").read_text() == "print(1)\n"
    assert modes(target) == {".": 0o555, "lib": 0o555, "lib/a.py": 0o444, "run.sh": 0o555}


def test_parents_are_implied_and_a_directory_may_be_named_after_its_contents(box: Path):
    archive = build_zip(box / "a.zip", [file("x/y/z.txt", b"z"), dir_("x"), dir_("x/y/"), file("./w", b"w")])
    target = box / "out"
    assert unpack(archive, target, max_bytes=MB) == UnpackResult(files=2, bytes=2)
    assert (target / "x" / "y" / "z.txt").read_bytes() == b"z"
    assert modes(target)["x/y"] == 0o555


def test_a_hard_link_becomes_a_copy_of_the_earlier_file(box: Path):
    archive = build_tar(box / "a.tar", [file("bin/tool", b"tool", mode=0o755), hardlink("bin/alias", "bin/tool")])
    target = box / "out"
    assert unpack(archive, target, max_bytes=MB) == UnpackResult(files=2, bytes=8)
    original, copy = os.lstat(target / "bin" / "tool"), os.lstat(target / "bin" / "alias")
    assert (target / "bin" / "alias").read_bytes() == b"tool"
    assert original.st_ino != copy.st_ino and copy.st_nlink == 1
    assert stat.S_IMODE(copy.st_mode) == 0o555


def test_an_empty_zip_unpacks_to_an_empty_directory(box: Path):
    archive = build_zip(box / "a.zip", [])
    assert archive.read_bytes()[:4] == b"PK\x05\x06"
    assert unpack(archive, box / "out", max_bytes=0) == UnpackResult(files=0, bytes=0)
    assert os.listdir(box / "out") == []


def test_exactly_the_limits_is_fine(box: Path):
    archive = build_tar(box / "a.tar", [file(f"f{i}", b"x" * 10) for i in range(10)])
    assert unpack(archive, box / "out", max_bytes=100, max_entries=10) == UnpackResult(files=10, bytes=100)


# --- formats ---------------------------------------------------------------------------


def test_the_format_is_told_by_magic_bytes_not_by_name():
    tar_head = bytes(257) + b"ustar\x0000" + bytes(250)
    assert archive_format(tar_head, "x.zip") == "tar"
    assert archive_format(b"\x1f\x8b\x08\x00", "x.tar") == "tar.gz"
    assert archive_format(b"PK\x03\x04rest") == "zip"
    assert archive_format(b"PK\x05\x06" + bytes(18)) == "zip"
    with pytest.raises(UnpackError, match=r"^'notes.txt' is not a \.tar, \.tar\.gz or \.zip archive$"):
        archive_format(b"just some text\n" * 40, "notes.txt")
    with pytest.raises(UnpackError, match="is not a .tar"):
        archive_format(b"")


def test_a_file_that_is_not_an_archive_is_refused_without_a_trace(box: Path):
    archive = box / "weights.bin"
    archive.write_bytes(os.urandom(4096).replace(b"\x1f\x8b", b"xx").replace(b"PK", b"pk"))
    refused(archive, "'weights.bin' is not a .tar, .tar.gz or .zip archive")


def test_gzip_that_holds_no_tar_is_refused(box: Path):
    archive = box / "a.tar.gz"
    archive.write_bytes(gzip.compress(b"hello, not a tar\n" * 100))
    refused(archive, "corrupt or truncated")


@pytest.mark.parametrize("existing", ["dir", "file", "dangling symlink"])
def test_an_existing_target_is_refused_and_left_alone(box: Path, existing: str):
    archive = build_tar(box / "a.tar", [file("f", b"new")])
    target = box / "out"
    if existing == "dir":
        target.mkdir()
        (target / "old").write_text("old")
    elif existing == "file":
        target.write_text("old")
    else:
        target.symlink_to("nowhere")
    with pytest.raises(UnpackError, match="already exists"):
        unpack(archive, target, max_bytes=MB)
    assert sorted(os.listdir(box)) == ["a.tar", "out"]
    if existing == "dir":
        assert os.listdir(target) == ["old"]
    elif existing == "file":
        assert target.read_text() == "old"
    else:
        assert os.readlink(target) == "nowhere"


# --- attacks ---------------------------------------------------------------------------

TAR_ATTACKS = {
    "absolute path": ([file("/etc/x", b"x")], "is absolute"),
    "dot-dot": ([file("../x", b"x")], r"contains '\.\.'"),
    "dot-dot inside": ([file("a/../../x", b"x")], r"contains '\.\.'"),
    "harmless-looking dot-dot": ([file("a/../b", b"x")], r"contains '\.\.'"),
    "empty name": ([file("", b"x")], "empty path"),
    "dot as a file": ([file(".", b"x")], "empty name"),
    "NUL in name": ([Entry("file", "a", pax={"path": "a\x00b"})], "NUL"),
    "symlink to /etc": ([symlink("etc", "/etc")], "is absolute"),
    "symlink to parent": ([symlink("a", ".."), file("a/x", b"x")], "points outside"),
    "deep symlink out": ([symlink("a/b/l", "../../../etc")], "points outside"),
    "write through symlink to root": ([symlink("a", "."), file("a/x", b"x")], "through the symlink 'a'"),
    "write through symlink to dir": ([dir_("sub"), symlink("d", "sub"), file("d/f", b"x")], "through the symlink 'd'"),
    "dir through symlink": ([symlink("d", "."), dir_("d/e")], "through the symlink"),
    "dot-dot after a symlink name": ([dir_("x"), symlink("x/s", ".."), symlink("l", "x/s/..")], "after a name"),
    "empty symlink target": ([symlink("l", "")], "empty target"),
    "hard link outside": ([hardlink("h", "../etc/passwd")], r"hard link target '\.\./etc/passwd' contains"),
    "hard link absolute": ([hardlink("h", "/etc/passwd")], "hard link target '/etc/passwd' is absolute"),
    "hard link to nothing": ([hardlink("h", "missing")], "not an earlier regular file"),
    "hard link to a later file": ([hardlink("h", "later"), file("later", b"x")], "not an earlier regular file"),
    "hard link to a dir": ([dir_("d"), hardlink("h", "d")], "not an earlier regular file"),
    "hard link to a symlink": ([file("f", b"x"), symlink("s", "f"), hardlink("h", "s")], "not an earlier regular"),
    "character device": ([special("null", tarfile.CHRTYPE)], "character device not allowed"),
    "block device": ([special("sda", tarfile.BLKTYPE)], "block device not allowed"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "FIFO not allowed"),
    "unknown type": ([special("odd", b"Z")], "entry of type"),
    "duplicate file": ([file("f", b"1"), file("f", b"2")], "duplicate entry"),
    "duplicate after normalizing": ([file("./x", b"1"), file("x", b"2")], "duplicate entry"),
    "file over a dir": ([dir_("d"), file("d", b"x")], "duplicate entry"),
    "symlink over implied dir": ([file("a/b", b"x"), symlink("a", ".")], "duplicate entry"),
    "dir over a file": ([file("f", b"x"), dir_("f")], "duplicate entry"),
    "file under a file": ([file("f", b"x"), file("f/x", b"y")], "parent 'f' is a file"),
    "long component": ([file("a" * 300, b"x")], "longer than 255"),
}


@pytest.mark.parametrize("entries, match", TAR_ATTACKS.values(), ids=TAR_ATTACKS.keys())
def test_a_hostile_tar_is_refused_and_leaves_nothing(box: Path, entries: list[Entry], match: str):
    message = refused(build_tar(box / "a.tar", entries), match)
    assert message.startswith("member ")


@pytest.mark.parametrize("entries, match", [
    ([file("../x", b"x")], r"contains '\.\.'"),
    ([symlink("a", ".."), file("a/x", b"x")], "points outside"),
    ([special("null", tarfile.CHRTYPE)], "character device"),
], ids=["dot-dot", "symlink out", "device"])
def test_a_hostile_tar_gz_is_refused_too(box: Path, entries: list[Entry], match: str):
    refused(build_tar(box / "a.tgz", entries, gz=True), match)


def test_a_refused_member_is_named_shortened(box: Path):
    message = refused(build_tar(box / "a.tar", [file("/" + "x" * 2000, b"x")]), "is absolute")
    assert "xxx..." in message and len(message) < 400


ZIP_ATTACKS = {
    "backslash dot-dot": ([file("..\\x", b"x")], r"contains '\.\.'"),
    "backslash dot-dot inside": ([file("a\\..\\..\\x", b"x")], r"contains '\.\.'"),
    "absolute": ([file("/abs", b"x")], "is absolute"),
    "backslash absolute": ([file("\\abs", b"x")], "is absolute"),
    "drive letter": ([file("C:\\x", b"x")], "drive letter"),
    "drive relative": ([file("C:x", b"x")], "drive letter"),
    "symlink absolute": ([symlink("l", "/etc/passwd")], "is absolute"),
    "symlink backslash out": ([symlink("l", "..\\..")], "points outside"),
    "write through symlink": ([dir_("d"), symlink("l", "d"), file("l/f", b"x")], "through the symlink 'l'"),
    "character device": ([Entry("special", "null", target=str(stat.S_IFCHR))], "character device"),
    "fifo": ([Entry("special", "pipe", target=str(stat.S_IFIFO))], "FIFO"),
    "duplicate": ([file("f", b"1"), file("f", b"2")], "duplicate entry"),
}


@pytest.mark.parametrize("entries, match", ZIP_ATTACKS.values(), ids=ZIP_ATTACKS.keys())
def test_a_hostile_zip_is_refused_and_leaves_nothing(box: Path, entries: list[Entry], match: str):
    refused(build_zip(box / "a.zip", entries), match)


# --- bombs and limits ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_a_bomb_is_refused_by_the_byte_limit(box: Path, fmt: str):
    archive = build(box / f"bomb.{fmt}", fmt, [file("zeros", bytes(10 * MB))])
    assert archive.stat().st_size < 100_000
    refused(archive, "limit of 1048576 bytes", max_bytes=MB)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_written_bytes_are_counted_even_when_declared_sizes_are_not_trusted(
        box: Path, fmt: str, monkeypatch: pytest.MonkeyPatch):
    archive = build(box / f"bomb.{fmt}", fmt, [file("zeros", bytes(10 * MB))])
    written = []
    real_write_all = unpack_module._write_all
    monkeypatch.setattr(unpack_module._Tree, "declare", lambda self, member, size: None)
    monkeypatch.setattr(unpack_module, "_write_all", lambda fd, data: (written.append(len(data)), real_write_all(fd, data)))
    refused(archive, "unpacked size exceeds the limit of 1048576 bytes", max_bytes=MB)
    assert MB - CHUNK <= sum(written) <= MB


def test_many_small_files_are_refused_once_declared_sizes_add_up(box: Path):
    archive = build_tar(box / "a.tar.gz", [file(f"f{i}", bytes(100_000)) for i in range(20)], gz=True)
    refused(archive, "member 'f10': declared sizes exceed the limit of 1048576 bytes", max_bytes=MB)


def test_hard_link_copies_count_against_the_byte_limit(box: Path):
    archive = build_tar(box / "a.tar", [file("big", bytes(600_000))] + [hardlink(f"h{i}", "big") for i in range(5)])
    refused(archive, "member 'h0': declared sizes exceed", max_bytes=MB)


@pytest.mark.parametrize("fmt", ["tar", "zip"])
def test_too_many_entries_are_refused(box: Path, fmt: str):
    archive = build(box / f"a.{fmt}", fmt, [file(f"f{i}", b"x") for i in range(11)])
    refused(archive, "more than the limit of 10", max_entries=10)


def test_implied_directories_count_against_the_entry_limit(box: Path):
    archive = build_tar(box / "a.tar", [file("a/b/c/d/e/f", b"x")])
    refused(archive, "more than the limit of 3 paths", max_entries=3)


def test_a_huge_tar_header_record_is_refused_before_it_is_read(box: Path):
    archive = build_tar(box / "a.tar", [file("x" * (2 * MB), b"x")])
    refused(archive, "header record is larger than")


# --- corrupt archives ------------------------------------------------------------------


def test_a_truncated_tar_gz_is_refused(box: Path):
    archive = build_tar(box / "a.tar.gz", [file("a", os.urandom(200_000)), file("b", b"b")], gz=True)
    archive.write_bytes(archive.read_bytes()[:100_000])
    refused(archive, "member 'a': corrupt or truncated archive")


def test_a_truncated_zip_is_refused(box: Path):
    archive = build_zip(box / "a.zip", [file("a", os.urandom(200_000)), file("b", b"b")])
    archive.write_bytes(archive.read_bytes()[:100_000])
    refused(archive, "corrupt or truncated archive")


def test_a_tar_cut_in_a_member_is_refused(box: Path):
    archive = build_tar(box / "a.tar", [file("a", os.urandom(5000))])
    archive.write_bytes(archive.read_bytes()[:3000])
    refused(archive, "member 'a': corrupt or truncated archive")


def test_a_tar_cut_between_members_is_refused(box: Path):
    archive = build_tar(box / "a.tar", [file("a", b"x" * 512), file("b", b"y")])
    data = archive.read_bytes()
    assert data[:3 * 512].count(b"x" * 512) == 1  # pax-less header, then exactly one data block
    archive.write_bytes(data[:2 * 512])
    refused(archive, "after member 'a': truncated or corrupt archive")


def test_a_tar_with_garbage_after_a_member_is_refused(box: Path):
    archive = build_tar(box / "a.tar", [file("a", b"x" * 512)])
    archive.write_bytes(archive.read_bytes()[:2 * 512] + b"garbage!" * 64 + bytes(1024))
    refused(archive, "no end-of-archive marker")


def test_a_zip_with_a_bad_crc_is_refused(box: Path):
    archive = box / "a.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("f", b"A" * 1000)
    data = archive.read_bytes()
    archive.write_bytes(data.replace(b"A" * 1000, b"A" * 999 + b"B"))
    refused(archive, "member 'f': corrupt or truncated archive .*CRC")


# --- any archive -----------------------------------------------------------------------

# Names are made of components (an empty first one makes the name absolute), weighted
# toward plain names so that a fair share of the archives is accepted and checked.
COMPONENTS = st.sampled_from(["a", "b", "c"] * 4 + [".", "..", "\\", "..\\a", "a\\..", ""])
NAMES = st.lists(COMPONENTS, min_size=1, max_size=3).map("/".join)
TARGETS = st.one_of(NAMES, st.lists(st.just(".."), min_size=1, max_size=2).map("/".join).flatmap(
    lambda up: NAMES.map(lambda rest: f"{up}/{rest}")))
ENTRIES = st.lists(st.tuples(st.sampled_from(["file", "dir", "symlink", "hardlink"]), NAMES, TARGETS), max_size=5)


def inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(["tar", "tar", "zip"]), entries=ENTRIES)
def test_any_archive_unpacks_inside_its_target_or_is_refused(fmt: str, entries: list[tuple[str, str, str]]):
    made = [file(name, b"data") if kind == "file" else
            dir_(name) if kind == "dir" else
            symlink(name, target) if kind == "symlink" else
            hardlink(name, target) if fmt == "tar" else file(name, b"h")
            for kind, name, target in entries]
    with tempfile.TemporaryDirectory() as tmp:
        box = Path(tmp, "box")
        box.mkdir()
        archive = build(box / f"a.{fmt}", fmt, made)
        out = box / "out"
        try:
            unpack(archive, out, max_bytes=MB, max_entries=50)
        except UnpackError as e:
            assert "\n" not in str(e)
            assert not os.path.lexists(out)
        else:
            root = os.path.realpath(out)
            for base, dirs, files in os.walk(out):
                for name in dirs + files:
                    path = os.path.join(base, name)
                    assert inside(os.path.abspath(path), str(out))
                    mode = os.lstat(path).st_mode
                    assert stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)
                    if stat.S_ISLNK(mode):
                        assert inside(os.path.realpath(path), root), (path, os.readlink(path))
                    else:
                        assert not stat.S_IMODE(mode) & 0o222
        assert os.listdir(tmp) == ["box"]
        assert set(os.listdir(box)) <= {"out", archive.name}
