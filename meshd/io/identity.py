"""On-disk identity and membership of a node (the data dir).

Invariants:
- The node key is created once, on first start, with mode 0600; the node id derives from it
  (meshd.tokens.node_id_for), so an identity cannot be claimed without the key.
- Files are replaced atomically (write to a temp file, fsync, rename), so a crash leaves
  either the old or the new content, never a torn file.
- membership.json holds the site's Raft secret: mode 0600, like the key.
- What is read back is checked: a key, membership or certificate file that is damaged
  (truncated, garbage, a flipped byte that breaks its form) raises DataDirError, whose
  message names the file and the way back, never a traceback and never an empty stand-in.
  A node key missing beside a membership is damage too (a new key would be a new node
  claiming the old one's place). ports.json is only a cache of the ports: when it is
  damaged or gone the node keeps the ports its membership records (the other voters know it
  by them), with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.tokens import node_id_for

log = logging.getLogger("meshd.daemon")

NODE_KEY_FILE = "node.key"  # the node's Ed25519 private key (PEM); also the TLS key
# The way back from a damaged identity: the site forgets this node, the device joins anew.
WAY_BACK = ("to bring this device back, run `meshctl node remove NODE` on another member, move {data_dir} aside "
            "and join it again with a new token")


class DataDirError(Exception):
    """A file of the data dir that the node's identity or membership rests on is damaged."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is damaged ({problem}); " + WAY_BACK.format(data_dir=path.parent))
        self.path = path


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` by `data` whole or not at all: temp file, fsync, rename, directory
    fsync. A failed write (a full disk: OSError ENOSPC) leaves `path` as it was, and no temp
    file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:  # a nearly full disk writes short before it refuses
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: str

    @property
    def fingerprint(self) -> str:
        return self.node_id


def load_or_create_identity(data_dir: Path) -> Identity:
    key_path = data_dir / NODE_KEY_FILE
    if key_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise DataDirError(key_path, f"not a readable private key: {str(e)[:80]}") from None
        except Exception as e:  # cryptography's UnsupportedAlgorithm and kin
            raise DataDirError(key_path, f"not a private key meshd can use: {type(e).__name__}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise DataDirError(key_path, "not an Ed25519 key")
    elif Membership.path(data_dir).exists():
        raise DataDirError(key_path, "missing, while membership.json says this node is a member")
    else:
        key = Ed25519PrivateKey.generate()
        write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Identity(private_key=key, public_key=public, node_id=node_id_for(public))


@dataclass
class Membership:
    """What a node needs to rejoin its site after a restart, with no peer reachable."""

    site: str
    mesh_id: str
    site_secret: str  # the Raft password: handed only to admitted members
    voter: bool
    peer_port: int
    raft_port: int
    partners: list[str] = field(default_factory=list)  # raft addresses of the other voters
    # The mesh root's private key (hex, raw Ed25519): voters hold it, since any of them may
    # lead and the leader issues membership certificates and signs trust documents.
    root_key: str = ""
    secret_epoch: int = 0  # which rotation of the site secret this is (higher wins)

    @staticmethod
    def path(data_dir: Path) -> Path:
        return data_dir / "membership.json"

    @classmethod
    def load(cls, data_dir: Path) -> "Membership | None":
        path = cls.path(data_dir)
        if not path.exists():
            # Raft starts only after membership.json was written: Raft data without it is a
            # member's data dir that lost it. (Certificates alone are not: they are saved
            # first, and a crash before membership.json leaves a joiner that joins again.)
            if (data_dir / "raft").exists():
                raise DataDirError(path, "missing, while this data dir holds a member's Raft data (raft/)")
            return None
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataDirError(path, f"not JSON: {str(e)[:80]}") from None
        if not isinstance(raw, dict):
            raise DataDirError(path, "not a JSON object")
        problem = _membership_problem(raw)
        if problem:
            raise DataDirError(path, problem)
        return cls(**raw)

    def save(self, data_dir: Path) -> None:
        write_atomic(self.path(data_dir), json.dumps(asdict(self), indent=2).encode())


def _membership_problem(raw: dict) -> str | None:
    """What is wrong with a membership.json's fields, or None."""
    unknown = sorted(set(raw) - {f.name for f in fields(Membership)})
    if unknown:
        return f"unknown field {unknown[0]!r}"
    required = ("site", "mesh_id", "site_secret", "voter", "peer_port", "raft_port")
    missing = [name for name in required if name not in raw]
    if missing:
        return f"missing field {missing[0]!r}"
    types = {"site": str, "mesh_id": str, "site_secret": str, "root_key": str, "voter": bool}
    for name, kind in types.items():
        if name in raw and not isinstance(raw[name], kind):
            return f"field {name!r} is not a {kind.__name__}"
    for name in ("peer_port", "raft_port"):
        if not _is_port(raw[name]):
            return f"field {name!r} is not a port"
    epoch = raw.get("secret_epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        return "field 'secret_epoch' is not a number"
    partners = raw.get("partners", [])
    if not isinstance(partners, list) or not all(isinstance(p, str) for p in partners):
        return "field 'partners' is not a list of addresses"
    if not raw["site_secret"] or not raw["site"]:
        return "the site or its secret is empty"
    return None


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


MEMBER_CERT_FILE = "member.pem"
ROOT_CERT_FILE = "root.pem"


def check_certificates(data_dir: Path) -> None:
    """The member certificate goes with the node key and the root certificate loads: what the
    peer port will serve with (raises DataDirError naming the file)."""
    key = data_dir / NODE_KEY_FILE
    for name in (MEMBER_CERT_FILE, ROOT_CERT_FILE):
        path = data_dir / name
        if not path.exists():
            raise DataDirError(path, "missing")
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if name == MEMBER_CERT_FILE:
                ctx.load_cert_chain(path, key)
            else:
                ctx.load_verify_locations(path)
        except (ssl.SSLError, ValueError) as e:
            raise DataDirError(path, f"not a certificate that goes with this node: {getattr(e, 'reason', None) or e}") \
                from None


def save_certificates(data_dir: Path, member_pem: str, root_pem: str) -> None:
    write_atomic(data_dir / MEMBER_CERT_FILE, member_pem.encode())
    write_atomic(data_dir / ROOT_CERT_FILE, root_pem.encode())


REVOKED_MARKER = "revoked.txt"


def write_revoked_marker(data_dir: Path, message: str) -> None:
    write_atomic(data_dir / REVOKED_MARKER, message.encode())


def read_revoked_marker(data_dir: Path) -> str | None:
    path = data_dir / REVOKED_MARKER
    return path.read_text(errors="replace").strip() if path.exists() else None


LOCK_FILE = "meshd.lock"  # held (flock) by the daemon that runs on the data dir; holds its pid


class DataDirLocked(Exception):
    def __init__(self, pid: str) -> None:
        super().__init__(pid)
        self.pid = pid


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir for this process: an exclusive flock on LOCK_FILE, held until the
    process ends (the kernel lets go of it however the process ends, so a crash leaves no
    stale lock). Returns the descriptor, to keep open. Raises DataDirLocked with the pid of
    the daemon that holds it."""
    import fcntl
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirLocked(holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


PORTS_FILE = "ports.json"


def load_ports(data_dir: Path) -> dict:
    """The ports picked at the first start ({"peer_port", "raft_port"}), or {} when there is
    no usable record (a damaged one is said in a warning: the membership's ports stand in)."""
    path = data_dir / PORTS_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raw = None
    if not (isinstance(raw, dict) and set(raw) == {"peer_port", "raft_port"} and all(map(_is_port, raw.values()))):
        log.warning(f"{path} is damaged; it is written again from the ports in use")
        return {}
    return raw


def save_ports(data_dir: Path, peer_port: int, raft_port: int, saved: dict) -> None:
    """Record the ports, writing only when they differ from `saved` (what load_ports read):
    a full disk, or an SD card's wear, are not worth a write per start."""
    wanted = {"peer_port": peer_port, "raft_port": raft_port}
    if saved != wanted:
        write_atomic(data_dir / PORTS_FILE, json.dumps(wanted).encode())
