"""A stock mDNS client on a lab host: avahi-daemon with `avahi-browse`, watching for meshd nodes.

It shows that meshd's announcement is ordinary DNS-SD (RFC 6763): a client that knows nothing
of meshd lists `_meshd._tcp`, resolves each instance to an address and port, and reads the
TXT record (node id, site, fingerprint, version).

The observer is its own little world on the host, touching nothing of the machine's:
- a private D-Bus bus (a socket file under the lab's root; avahi talks to its clients only over
  D-Bus) with a permissive policy, since only the lab's own processes can reach the socket;
- avahi-daemon in the host's namespace on eth0 only, IPv4, publishing nothing, with a private
  tmpfs over /run/avahi-daemon (its pid file), so a system avahi-daemon, if any, is unaffected;
- `avahi-browse -p -r` (parsable, resolve) running the whole time; every resolved line is
  stamped with time.monotonic() when it arrives.
Everything is started through `Lab.spawn`, so the lab's `close()` stops it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.lab import Lab
from tests.lab.output import StampedOutput

SERVICE_TYPE = "_meshd._tcp"  # as meshd.io.mdns announces it, without the ".local." domain
STARTUP_TIMEOUT_S = 15.0  # bus + daemon start well within this on a loaded 2-core machine

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"""

AVAHI_CONFIG = """[server]
host-name=lab-observer
use-ipv4=yes
use-ipv6=no
allow-interfaces=eth0
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
"""


@dataclass(frozen=True)
class Resolved:
    """One `=` line of `avahi-browse -p -r`: an instance resolved to host, address, port, TXT."""
    at: float
    interface: str
    instance: str
    service_type: str
    host_name: str
    address: str
    port: int
    txt: dict[str, str]


def parse_txt(field: str) -> dict[str, str]:
    """avahi-browse prints TXT as space-separated quoted strings: "k=v" "k2=v2"."""
    out: dict[str, str] = {}
    for item in field.split('" "'):
        item = item.strip('"')
        key, sep, value = item.partition("=")
        if key and sep:
            out[key] = value
    return out


def parse_resolved(line: str, at: float) -> Resolved | None:
    """A resolved IPv4 record from avahi-browse's parsable output, or None for any other line."""
    fields = line.rstrip("\n").split(";", 9)
    if len(fields) != 10 or fields[0] != "=" or fields[2] != "IPv4":
        return None
    try:
        port = int(fields[8])
    except ValueError:
        return None
    return Resolved(at, fields[1], fields[3], fields[4], fields[6], fields[7], port, parse_txt(fields[9]))


def require_avahi() -> None:
    missing = [tool for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed (apt-get install avahi-daemon avahi-utils dbus)")


class AvahiObserver:
    def __init__(self, lab: Lab, host: str, workdir: Path):
        self.lab = lab
        self.host = host
        self.workdir = Path(workdir)
        self.bus_socket = self.workdir / "bus"
        self.env = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus_socket}"}
        self.browse: StampedOutput[Resolved] | None = None

    def start(self) -> AvahiObserver:
        require_avahi()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "bus.conf").write_text(BUS_CONFIG.format(socket=self.bus_socket))
        (self.workdir / "avahi-daemon.conf").write_text(AVAHI_CONFIG)
        self.lab.spawn(self.host, ["dbus-daemon", f"--config-file={self.workdir / 'bus.conf'}", "--nofork"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.bus_socket.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the observer's D-Bus did not start")
            time.sleep(0.02)
        # `ip netns exec` gives the command its own mount namespace: the tmpfs is private to it.
        daemon = self.lab.spawn(self.host, [
            "sh", "-c", "mkdir -p /run/avahi-daemon && mount -t tmpfs none /run/avahi-daemon && exec avahi-daemon "
            f"-f {self.workdir / 'avahi-daemon.conf'} --no-chroot --no-drop-root --no-rlimits"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        StampedOutput(daemon, lambda line, at: None, f"avahi-daemon on {self.host}").wait_line(
            "Server startup complete", STARTUP_TIMEOUT_S)
        proc = self.lab.spawn(self.host, ["avahi-browse", "-p", "-r", SERVICE_TYPE], env=self.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.browse = StampedOutput(proc, parse_resolved, f"avahi-browse on {self.host}")
        return self

    def wait_resolved(self, node_id: str, after: float = 0.0, timeout: float = 30.0) -> Resolved:
        """The first resolution of the meshd node `node_id` that arrived at or after `after`."""
        return self.browse.wait(lambda r: r.txt.get("id") == node_id and r.at >= after, timeout,
                                f"meshd node {node_id[:16]}")
