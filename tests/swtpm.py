"""A real software TPM 2.0 (swtpm) per test: its own state dir, its own loopback ports.

swtpm runs the reference TPM 2.0 implementation (libtpms); meshd talks to it through
libtss2's swtpm TCTI exactly as it talks to /dev/tpmrm0. Where swtpm is missing the TPM tests
skip, unless MESHD_REQUIRE_SWTPM=1 (set by CI, which installs it) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from meshd.io.ports import free_port

START_TIMEOUT = 10.0  # swtpm answers within milliseconds; a loaded CI machine gets slack


def require_swtpm() -> None:
    missing = [tool for tool in ("swtpm", "tpm2_pcrextend") if shutil.which(tool) is None]
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        missing.append("tpm2-pytss")
    if missing:
        message = f"needs {', '.join(missing)} (apt-get install swtpm tpm2-tools; pip install tpm2-pytss)"
        if os.environ.get("MESHD_REQUIRE_SWTPM") == "1":
            pytest.fail(message)
        pytest.skip(message)


class SoftwareTpm:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> SoftwareTpm:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a port picked free can be taken before swtpm binds it
            self.port = free_port()
            ctrl = self.port + 1  # libtss2's swtpm TCTI finds the control channel there
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pcr_extend(self, pcr: int, digest_hex: str) -> None:
        """What another program on the device could do: extend a PCR behind meshd's back."""
        subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256={digest_hex}"], check=True, capture_output=True,
                       env=dict(os.environ, TPM2TOOLS_TCTI=self.tcti))
