"""Unpack a verified archive artifact (.tar, .tar.gz/.tgz, .zip) into a read-only directory.

The archive's signature says who made it, not that it is harmless: every member is
checked as hostile input before anything is created for it, and members are written one
by one with `os.open(..., O_CREAT | O_EXCL | O_NOFOLLOW)` under directories this module
made itself (never `extractall`). The tree is built in a fresh sibling directory
`.<target name>.unpacking-<random>` and renamed to `target` once everything succeeded.

Invariants:
- Nothing outside `target` is ever written: member paths are relative, without `..`, NUL
  or (in zip) drive letters, and backslashes in zip names count as separators; every
  parent of a member must be a directory this unpack created (never a symlink or a file),
  each opened with O_NOFOLLOW, so no symlink is ever followed while extracting.
- Every symlink resolves inside the tree: its target is relative, climbs with leading `..`
  no higher than the root, and has no `..` after a name (a name may itself be a symlink,
  which would make a lexical check meaningless). A hard link becomes a copy of an earlier
  regular file of the archive; nothing else (devices, FIFOs, ...) is created.
- `target` appears only complete: on any refusal or error the temporary directory is
  removed and `target` never appears; on success files and directories are fsynced before
  the rename. `target` must not exist beforehand (callers serialize unpacks of one target;
  an empty directory created at `target` by someone else during the unpack may be replaced).
- At most `max_bytes` bytes are ever written: declared sizes are checked before a member
  is written, and the bytes actually written are counted chunk by chunk, so a zip or gzip
  bomb stops within one chunk of the limit. At most `max_entries` members are read, and at
  most as many paths (implied parent directories included) are created.
- The result is read-only: files 0444 (0555 when the archive marks them executable by
  their owner), directories 0555. Ownership, mtimes and setuid/setgid/sticky bits from the
  archive are ignored.
- Every refusal is an UnpackError whose message names the member and the reason, on one
  line (names shortened). Errors of the host filesystem itself (disk full, permission
  denied on the parent) propagate as OSError, after the same cleanup.
"""

from __future__ import annotations

import errno
import gzip
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# A model bundle or a program tree has far fewer members; the bound keeps the bookkeeping
# (one dict entry per path) and the inodes an archive can consume finite.
MAX_ENTRIES = 100_000
# Read/write unit while streaming member data: large enough for few syscalls, small enough
# that a bomb is stopped within 64 KiB of the byte limit.
CHUNK = 64 * 1024

# Bytes of the archive's start archive_format looks at: the tar magic sits at 257..262.
_HEAD_BYTES = 512
_TAR_MAGIC_OFFSET = 257
# tarfile reads each header record (pax extended header, GNU long name) into memory whole;
# real ones are a few hundred bytes, so a bigger one is an attack on memory, not metadata.
_MAX_RECORD = 1024 * 1024
# Linux limits on a name component and a path: refused up front with a clear reason
# instead of an ENAMETOOLONG halfway through.
_NAME_MAX = 255
_PATH_MAX = 4096
# Member names and targets in messages are cut to this many characters: a 4 KiB name
# would drown the reason an operator needs to read.
_SHOW_CHARS = 120
# Same for the text of an underlying exception quoted as the cause.
_CAUSE_CHARS = 200

# Modes while building: private to this process's user until the tree is sealed.
_WORK_DIR_MODE = 0o700
_WORK_FILE_MODE = 0o600
# Final modes: nothing in an unpacked tree is writable, by anyone.
_DIR_MODE = 0o555
_FILE_MODE = 0o444
_EXEC_FILE_MODE = 0o555

# The zip "made by" system whose external attributes carry a Unix st_mode in the high 16
# bits; other systems (MS-DOS, NTFS) store DOS attributes there.
_ZIP_UNIX = 3
# General purpose flag bit 0: the member is encrypted (we have no password, and will not guess).
_ZIP_ENCRYPTED = 0x1

_DIR = "directory"
_FILE = "file"
_SYMLINK = "symlink"

_TAR_TYPE_NAMES = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}
_ZIP_TYPE_NAMES = {
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
}

# OS errors that only an archive's own content can cause here (our bookkeeping should have
# refused first; O_EXCL / O_NOFOLLOW are the second line): reported as a refusal.
_ARCHIVE_ERRNOS = frozenset({errno.EEXIST, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
# What reading a hostile archive can raise from the standard library's readers.
_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
            NotImplementedError, struct.error, ValueError, OSError)

_DRIVE = re.compile(r"^[A-Za-z]:")


class UnpackError(ValueError):
    """An archive refused; the message is the reason an operator sees (one line)."""


@dataclass(frozen=True)
class UnpackResult:
    files: int  # regular files written (hard links count, as the copies they became)
    bytes: int  # bytes written, all files together


def archive_format(data_head: bytes, name: str = "") -> str:
    """"tar", "tar.gz" or "zip", from the archive's first bytes (`_HEAD_BYTES` are enough);
    `name` only names the archive in the refusal."""
    if data_head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if data_head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data_head[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    raise UnpackError(f"{_show(name) if name else 'the artifact'} is not a .tar, .tar.gz or .zip archive")


def unpack(archive: Path, target: Path, *, max_bytes: int, max_entries: int = MAX_ENTRIES) -> UnpackResult:
    """Unpack `archive` into the new directory `target` (whose parent must exist), or raise
    UnpackError and leave no trace. See the module docstring for what is refused."""
    if max_bytes < 0 or max_entries < 0:
        raise ValueError(f"limits must not be negative (max_bytes={max_bytes}, max_entries={max_entries})")
    archive, target = Path(archive), Path(target)
    if os.path.lexists(target):
        raise UnpackError(f"target {_show(str(target))} already exists")
    with open(archive, "rb") as raw:
        kind = archive_format(raw.read(_HEAD_BYTES), archive.name)
        raw.seek(0)
        work = tempfile.mkdtemp(prefix=f".{target.name}.unpacking-", dir=target.parent)
        try:
            tree = _Tree(work, max_bytes=max_bytes, max_entries=max_entries)
            try:
                if kind == "zip":
                    _fill_from_zip(raw, tree)
                elif kind == "tar.gz":
                    with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                        _fill_from_tar(unzipped, tree)
                else:
                    _fill_from_tar(raw, tree)
                tree.seal()
            finally:
                tree.close()
            _rename_new(work, target)
        except BaseException:
            _remove_tree(work)
            raise
    _fsync_dir_path(target.parent)
    return UnpackResult(files=tree.files, bytes=tree.bytes)


# --- tar -------------------------------------------------------------------------------


def _fill_from_tar(fileobj, tree: _Tree) -> None:
    capped = _CappedReader(fileobj)
    with _reading("archive"):
        tar = tarfile.TarFile(fileobj=capped, mode="r")
    try:
        members = iter(tar)
        last: str | None = None
        while True:
            with _reading(f"after member {_show(last)}" if last is not None else "archive"):
                member = next(members, None)
            if member is None:
                break
            _add_tar_member(tar, member, tree)
            last = member.name
        # tarfile takes a damaged or missing header after the first as the end of the archive;
        # a real end is a zero block, anything else is a truncated or corrupt archive.
        with _reading("end of archive"):
            capped.seek(tar.offset)
            end = capped.read(tarfile.BLOCKSIZE)
        if end != bytes(tarfile.BLOCKSIZE):
            where = f"after member {_show(last)}" if last is not None else "archive"
            raise UnpackError(f"{where}: truncated or corrupt archive (no end-of-archive marker)")
    finally:
        tar.close()


def _add_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tree: _Tree) -> None:
    name = member.name
    tree.count_member(name)
    parts = _parts(name, name)
    if member.isdir():
        tree.add_dir(name, parts)
    elif member.isreg():
        tree.declare(name, member.size)
        with _reading(f"member {_show(name)}"):
            data = tar.extractfile(member)
        assert data is not None  # a regular member always has a file object
        tree.add_file(name, parts, _guarded(data.read, name), executable=bool(member.mode & stat.S_IXUSR))
    elif member.issym():
        tree.add_symlink(name, parts, member.linkname)
    elif member.islnk():
        tree.add_hardlink(name, parts, _parts(name, member.linkname, "hard link target"))
    else:
        what = _TAR_TYPE_NAMES.get(member.type, f"entry of type {member.type!r}")
        raise UnpackError(f"member {_show(name)}: {what} not allowed (only files, directories and links)")


class _CappedReader:
    """The tar stream as tarfile reads it, refusing any single read bigger than _MAX_RECORD
    (member data is read in CHUNKs; only a header record can ask for more)."""

    def __init__(self, raw) -> None:
        self._raw = raw

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_RECORD:
            raise UnpackError(f"archive: a tar header record is larger than {_MAX_RECORD} bytes")
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


# --- zip -------------------------------------------------------------------------------


def _fill_from_zip(raw, tree: _Tree) -> None:
    with _reading("archive"):
        zf = zipfile.ZipFile(raw)
    with zf:
        infos = zf.infolist()
        if len(infos) > tree.max_entries:
            raise UnpackError(f"archive has {len(infos)} entries, more than the limit of {tree.max_entries}")
        for info in infos:  # declared sizes first: refuse a bomb before writing anything
            tree.declare(info.orig_filename, info.file_size)
        for info in infos:
            _add_zip_member(zf, info, tree)


def _add_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, tree: _Tree) -> None:
    name = info.orig_filename  # ZipInfo.filename is cut at a NUL byte; the original is not
    tree.count_member(name)
    path = _zip_path(name, name, "path")
    parts = _parts(name, path)
    if info.flag_bits & _ZIP_ENCRYPTED:
        raise UnpackError(f"member {_show(name)}: encrypted members are not supported")
    mode = info.external_attr >> 16 if info.create_system == _ZIP_UNIX else 0
    kind = stat.S_IFMT(mode)
    if path.endswith("/") or kind == stat.S_IFDIR:
        tree.add_dir(name, parts)
    elif kind == stat.S_IFLNK:
        with _reading(f"member {_show(name)}"):
            with zf.open(info) as data:
                raw_target = data.read(_PATH_MAX + 1)
        if len(raw_target) > _PATH_MAX:
            raise UnpackError(f"member {_show(name)}: symlink target longer than {_PATH_MAX} bytes")
        tree.add_symlink(name, parts, _zip_path(name, os.fsdecode(raw_target), "symlink target"))
    elif kind in (0, stat.S_IFREG):
        with _reading(f"member {_show(name)}"):
            data = zf.open(info)
        with data:
            tree.add_file(name, parts, _guarded(data.read, name), executable=bool(mode & stat.S_IXUSR))
    else:
        what = _ZIP_TYPE_NAMES.get(kind, f"entry of file type {kind:#o}")
        raise UnpackError(f"member {_show(name)}: {what} not allowed (only files, directories and links)")


def _zip_path(member: str, path: str, what: str) -> str:
    """A zip path with Windows tricks refused and backslashes turned into separators."""
    if "\x00" in path:
        raise UnpackError(f"member {_show(member)}: {what} contains a NUL byte")
    path = path.replace("\\", "/")
    if _DRIVE.match(path):
        raise UnpackError(f"member {_show(member)}: {what} {_show(path)} starts with a drive letter")
    return path


# --- paths -----------------------------------------------------------------------------


def _parts(member: str, path: str, what: str = "path") -> tuple[str, ...]:
    """The components of a member path relative to the root (() is the root itself), or a
    refusal: empty, NUL, absolute, `..`, too long. `.` and empty components are dropped."""
    if not path:
        raise UnpackError(f"member {_show(member)}: empty {what}")
    if "\x00" in path:
        raise UnpackError(f"member {_show(member)}: {what} contains a NUL byte")
    if path.startswith("/"):
        raise UnpackError(f"member {_show(member)}: {what} {_show(path)} is absolute")
    if _encoded_len(member, path) > _PATH_MAX:
        raise UnpackError(f"member {_show(member)}: {what} longer than {_PATH_MAX} bytes")
    parts: list[str] = []
    for component in path.split("/"):
        if component in ("", "."):
            continue
        if component == "..":
            raise UnpackError(f"member {_show(member)}: {what} {_show(path)} contains '..'")
        if _encoded_len(member, component) > _NAME_MAX:
            raise UnpackError(f"member {_show(member)}: {what} has a name longer than {_NAME_MAX} bytes")
        parts.append(component)
    return tuple(parts)


def _check_link_target(member: str, link_dir: tuple[str, ...], target: str) -> None:
    """Refuse a symlink target that is absolute or can resolve outside the root."""
    if not target:
        raise UnpackError(f"member {_show(member)}: symlink with an empty target")
    if "\x00" in target:
        raise UnpackError(f"member {_show(member)}: symlink target contains a NUL byte")
    if target.startswith("/"):
        raise UnpackError(f"member {_show(member)}: symlink target {_show(target)} is absolute")
    if _encoded_len(member, target) > _PATH_MAX:
        raise UnpackError(f"member {_show(member)}: symlink target longer than {_PATH_MAX} bytes")
    depth = len(link_dir)
    named = False
    for component in target.split("/"):
        if component in ("", "."):
            continue
        if component != "..":
            named = True
        elif named:
            # After a name the kernel climbs from wherever that name leads (it may be a
            # symlink itself), so only leading '..' can be checked against the root.
            raise UnpackError(f"member {_show(member)}: symlink target {_show(target)} has '..' after a name")
        else:
            depth -= 1
            if depth < 0:
                raise UnpackError(f"member {_show(member)}: symlink target {_show(target)} points outside the archive")


def _encoded_len(member: str, text: str) -> int:
    try:
        return len(os.fsencode(text))
    except UnicodeError:
        raise UnpackError(f"member {_show(member)}: name is not valid for this filesystem") from None


# --- the tree being built --------------------------------------------------------------


class _Tree:
    """The temporary directory being filled: what each path in it is (only what this unpack
    created exists there), the limits, and the counts."""

    def __init__(self, root: str, *, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.files = 0
        self.bytes = 0
        self._members = 0
        self._declared = 0
        self._kinds: dict[tuple[str, ...], str] = {(): _DIR}
        self._dirs: list[tuple[str, ...]] = []
        self._regular: dict[tuple[str, ...], bool] = {}  # path -> executable
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._root_fd)

    # limits

    def count_member(self, member: str) -> None:
        self._members += 1
        if self._members > self.max_entries:
            raise UnpackError(f"member {_show(member)}: archive has more than the limit of {self.max_entries} entries")

    def declare(self, member: str, size: int) -> None:
        """Refuse before writing when the declared sizes so far already exceed max_bytes."""
        self._declared += max(0, size)
        if self._declared > self.max_bytes:
            raise UnpackError(f"member {_show(member)}: declared sizes exceed the limit of {self.max_bytes} bytes")

    # members

    def add_dir(self, member: str, parts: tuple[str, ...]) -> None:
        if not parts:
            return  # "./": the root itself
        parent = self._parent(member, parts)
        try:
            if self._kinds.get(parts) == _DIR:
                return  # a directory named again (or after its contents) changes nothing
            self._claim(member, parts, _DIR)
            self._mkdir(member, parent, parts)
        finally:
            os.close(parent)

    def add_file(self, member: str, parts: tuple[str, ...], read: Callable[[int], bytes], *,
                 executable: bool) -> None:
        if not parts:
            raise UnpackError(f"member {_show(member)}: a file with an empty name")
        parent = self._parent(member, parts)
        try:
            self._claim(member, parts, _FILE)
            with _creating(member):
                fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             _WORK_FILE_MODE, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            while chunk := read(CHUNK):
                if self.bytes + len(chunk) > self.max_bytes:
                    raise UnpackError(f"member {_show(member)}: unpacked size exceeds the limit of {self.max_bytes} bytes")
                _write_all(fd, chunk)
                self.bytes += len(chunk)
            os.fchmod(fd, _EXEC_FILE_MODE if executable else _FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._regular[parts] = executable
        self.files += 1

    def add_symlink(self, member: str, parts: tuple[str, ...], target: str) -> None:
        if not parts:
            raise UnpackError(f"member {_show(member)}: a symlink with an empty name")
        _check_link_target(member, parts[:-1], target)
        parent = self._parent(member, parts)
        try:
            self._claim(member, parts, _SYMLINK)
            with _creating(member):
                os.symlink(target, parts[-1], dir_fd=parent)
        finally:
            os.close(parent)

    def add_hardlink(self, member: str, parts: tuple[str, ...], source: tuple[str, ...]) -> None:
        """A copy of the earlier regular file `source` (never a real hard link: the copy
        cannot alias anything, and counts against max_bytes like any file)."""
        if source not in self._regular:
            raise UnpackError(f"member {_show(member)}: hard link to {_show('/'.join(source))}, "
                              "which is not an earlier regular file of the archive")
        parent = self._open_dir(source[:-1])
        try:
            fd = os.open(source[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            self.declare(member, os.fstat(fd).st_size)
            self.add_file(member, parts, lambda n: os.read(fd, n), executable=self._regular[source])
        finally:
            os.close(fd)

    def seal(self) -> None:
        """Make every directory read-only, deepest first, and durable (files already are)."""
        for parts in sorted(self._dirs, key=len, reverse=True):
            fd = self._open_dir(parts)
            try:
                os.fchmod(fd, _DIR_MODE)
                _fsync_dir_fd(fd)
            finally:
                os.close(fd)
        os.fchmod(self._root_fd, _DIR_MODE)
        _fsync_dir_fd(self._root_fd)

    # paths

    def _claim(self, member: str, parts: tuple[str, ...], kind: str) -> None:
        existing = self._kinds.get(parts)
        if existing is not None:
            raise UnpackError(f"member {_show(member)}: duplicate entry (would replace the {existing} "
                              f"{_show('/'.join(parts))})")
        if len(self._kinds) > self.max_entries:  # the root is in _kinds: this is paths + 1
            raise UnpackError(f"member {_show(member)}: creates more than the limit of {self.max_entries} paths "
                              "(implied directories count)")
        self._kinds[parts] = kind

    def _mkdir(self, member: str, parent: int, parts: tuple[str, ...]) -> None:
        with _creating(member):
            os.mkdir(parts[-1], _WORK_DIR_MODE, dir_fd=parent)
            fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.fchmod(fd, _WORK_DIR_MODE)  # whatever the umask took away
        finally:
            os.close(fd)
        self._dirs.append(parts)

    def _parent(self, member: str, parts: tuple[str, ...]) -> int:
        """An fd of the directory `member` goes in, creating implied directories; refused
        when a parent is a symlink or a file. The caller closes it."""
        fd = os.dup(self._root_fd)
        try:
            for i in range(1, len(parts)):
                prefix = parts[:i]
                kind = self._kinds.get(prefix)
                if kind is None:
                    self._claim(member, prefix, _DIR)
                    self._mkdir(member, fd, prefix)
                elif kind == _SYMLINK:
                    raise UnpackError(f"member {_show(member)}: would be written through the symlink "
                                      f"{_show('/'.join(prefix))}")
                elif kind != _DIR:
                    raise UnpackError(f"member {_show(member)}: its parent {_show('/'.join(prefix))} is a {kind}")
                with _creating(member):
                    child = os.open(prefix[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_dir(self, parts: tuple[str, ...]) -> int:
        """An fd of the directory at `parts`, one this unpack created (no symlink followed)."""
        fd = os.dup(self._root_fd)
        try:
            for component in parts:
                child = os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise


# --- helpers ---------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _guarded(read: Callable[[int], bytes], member: str) -> Callable[[int], bytes]:
    """`read` with the archive readers' errors turned into a refusal naming `member`."""
    def guarded(size: int) -> bytes:
        with _reading(f"member {_show(member)}"):
            return read(size)
    return guarded


@contextmanager
def _reading(where: str) -> Iterator[None]:
    """Errors of the archive readers (corrupt, truncated, bad CRC) as an UnpackError."""
    try:
        yield
    except UnpackError:
        raise
    except _CORRUPT as e:
        cause = " ".join(str(e).split()) or "no detail"
        if len(cause) > _CAUSE_CHARS:
            cause = cause[:_CAUSE_CHARS - 3] + "..."
        raise UnpackError(f"{where}: corrupt or truncated archive ({type(e).__name__}: {cause})") from e


@contextmanager
def _creating(member: str) -> Iterator[None]:
    """OS errors only the archive's own content can cause, as a refusal naming `member`."""
    try:
        yield
    except OSError as e:
        if e.errno not in _ARCHIVE_ERRNOS:
            raise
        raise UnpackError(f"member {_show(member)}: cannot be created ({os.strerror(e.errno)})") from e


def _rename_new(work: str, target: Path) -> None:
    if os.path.lexists(target):
        raise UnpackError(f"target {_show(str(target))} already exists")
    try:
        os.rename(work, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise UnpackError(f"target {_show(str(target))} already exists") from e
        raise


def _remove_tree(path: str) -> None:
    """Remove a (possibly partly read-only) temporary tree; never raises."""
    for base, _dirs, _files in os.walk(path):  # top-down: each directory writable before its entries go
        try:
            os.chmod(base, _WORK_DIR_MODE)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # filesystems without directory fsync
            raise


def _fsync_dir_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_dir_fd(fd)
    finally:
        os.close(fd)


def _show(name: str | None) -> str:
    """A member name fit for a one-line message: shortened, quoted, control characters escaped."""
    text = "" if name is None else name
    if len(text) > _SHOW_CHARS:
        text = text[:_SHOW_CHARS - 3] + "..."
    return repr(text)
