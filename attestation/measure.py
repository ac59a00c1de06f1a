"""The package digest: the one algorithm that turns meshd's code into the reference value a
node's evidence claims (`meshd-package`) and a policy allows.

Pure and standard-library only, so that whatever reads a build (the installed node's attester,
`meshd digest` on a .deb, a wheel or a directory, the package build that ships the digest)
computes it the same way without importing meshd's dependencies.

Invariants:
- The digest covers every .py file of the measured packages (MEASURED_NAMES), by package,
  path inside it and contents, and nothing else (no caches, no data files): the same code
  gives the same digest wherever it lies, and any change to it changes the digest.
- Each file is framed by lengths, so no two different sets of files digest alike by moving
  bytes between names and contents.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

# The packages whose code runs in the daemon and is measured, in digest order.
MEASURED_NAMES = ("meshd", "attestation", "crdt")


def digest_of(files: Iterable[tuple[str, tuple[str, ...], bytes]]) -> str:
    """The package digest of `files`: (package, path parts inside it, contents) of every .py
    file of the measured packages, from wherever they are read: packages in MEASURED_NAMES
    order, files in path order within each."""
    order = {name: i for i, name in enumerate(MEASURED_NAMES)}
    digest = hashlib.sha256()
    for package, parts, data in sorted(files, key=lambda f: (order.get(f[0], len(order)), f[0], f[1])):
        name = f"{package}/{'/'.join(parts)}".encode()
        digest.update(len(name).to_bytes(4, "big") + name + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def measured_file(parts: tuple[str, ...]) -> bool:
    """Whether a file at these path parts (inside a package) is measured."""
    return bool(parts) and parts[-1].endswith(".py") and "__pycache__" not in parts
