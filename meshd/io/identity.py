"""On-disk identity and membership of a node (the data dir).

Invariants:
- The node key is created once, on first start, with mode 0600; the node id derives from it
  (meshd.tokens.node_id_for), so an identity cannot be claimed without the key.
- Files are replaced atomically (write to a temp file, fsync, rename), so a crash leaves
  either the old or the new content, never a torn file.
- membership.json holds the site's Raft secret: mode 0600, like the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshd.tokens import node_id_for

NODE_KEY_FILE = "node.key"  # the node's Ed25519 private key (PEM); also the TLS key


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_path} is not an Ed25519 key")
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
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, data_dir: Path) -> None:
        write_atomic(self.path(data_dir), json.dumps(asdict(self), indent=2).encode())


MEMBER_CERT_FILE = "member.pem"
ROOT_CERT_FILE = "root.pem"


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


def load_ports(data_dir: Path) -> dict:
    path = data_dir / "ports.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_ports(data_dir: Path, peer_port: int, raft_port: int) -> None:
    write_atomic(data_dir / "ports.json", json.dumps({"peer_port": peer_port, "raft_port": raft_port}).encode())
