"""A multi-host lab on one machine: every host its own network namespace, every site its own
Ethernet segment, a router between sites; `meshd run` on each host; faults on demand.

Layout (site k = 1, 2, ...; addresses only from the benchmarking range 198.18.0.0/15, RFC 2544):
- host j of site k: namespace `<prefix>-<site>-<j>`, eth0 = 198.18.k.(10 + j)/24, default
  route via the router; its daemon listens and advertises there and finds the others by
  mDNS on eth0 (no --peer).
- router: namespace `<prefix>-router`, one interface per site, 198.18.k.1/24, forwarding on.
- segments: TAP devices held by tests.lab.switch (a hub per site with partitions, delay and
  loss); the kernel here has no netem, see that module.

Faults: `partition(groups)`, `heal()`, `kill(host)` (SIGKILL), `restart(host)`,
`pause(host)`/`resume(host)` (SIGSTOP/SIGCONT), `netem(host, delay, loss)`.
Other programs on a host (Serf agents, an mDNS observer): `spawn(host, argv)`.

Invariants:
- `close()` (also on a failed build, and at interpreter exit) stops every daemon, kills their
  workloads and every spawned program, closes the segments and deletes every namespace this lab made; it touches
  nothing it did not make (names carry a per-lab prefix).
- Host logs live under the lab's root; `keep_logs(dest)` copies them out for a failed test.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from meshd.io.localsite import LocalNode, LocalSite, wait_for
from tests.lab.switch import Link, Segments, open_tap

ADDRESS_BASE = "198.18"  # RFC 2544 benchmarking range: never a real network's addresses
FIRST_HOST = 10  # .1 is the router; hosts from .10 up
MAX_SITES = 250  # one /24 per site inside 198.18.0.0/16
MAX_HOSTS_PER_SITE = 200


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def require_lab(*programs: str) -> None:
    """Skip (or, under MESHD_REQUIRE_LAB=1 as in CI, fail) where namespaces cannot be made or
    one of `programs` (peers run on the hosts) is not installed."""
    import pytest
    problem = None
    missing = [p for p in programs if shutil.which(p) is None]
    if os.geteuid() != 0:
        problem = "needs root for network namespaces"
    elif shutil.which("ip") is None:
        problem = "needs iproute2 (ip)"
    elif not os.path.exists("/dev/net/tun"):
        problem = "needs /dev/net/tun"
    elif missing:
        problem = f"needs {', '.join(missing)} installed"
    if problem:
        if os.environ.get("MESHD_REQUIRE_LAB") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@dataclass
class Host:
    name: str  # "<site>-<j>"
    site: str
    namespace: str
    address: str
    node: LocalNode | None = None

    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)


class Lab:
    def __init__(self, root: Path, sites: dict[str, int], meshd_args: tuple[str, ...] = (), seed: int = 0) -> None:
        if len(sites) > MAX_SITES or any(n > MAX_HOSTS_PER_SITE for n in sites.values()):
            raise ValueError("too many sites or hosts for the lab's address plan")
        self.root = Path(root)
        self.prefix = "ml" + secrets.token_hex(3)  # keeps interface names under 16 bytes
        self.segments = Segments(seed)
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.router = f"{self.prefix}-router"
        self.sites: dict[str, LocalSite] = {}
        self._site_index = {name: k + 1 for k, name in enumerate(sites)}
        self._counts = dict(sites)
        self._tap_count = 0
        self._meshd_args = tuple(meshd_args)
        self._spawned: list[subprocess.Popen] = []  # other programs on the hosts (peers, observers)
        atexit.register(self.close)

    # --- building --------------------------------------------------------------------------

    def build(self) -> Lab:
        try:
            self._add_namespace(self.router)
            ip("netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for site, k in self._site_index.items():
                self._attach(self.router, f"{site}-router", site, f"{ADDRESS_BASE}.{k}.1")
                for j in range(1, self._counts[site] + 1):
                    name = f"{site}-{j}"
                    host = Host(name, site, f"{self.prefix}-{name}", f"{ADDRESS_BASE}.{k}.{FIRST_HOST + j}")
                    self._add_namespace(host.namespace)
                    self._attach(host.namespace, name, site, host.address)
                    ip("-n", host.namespace, "route", "add", "default", "via", f"{ADDRESS_BASE}.{k}.1")
                    self.hosts[name] = host
                self.root.mkdir(parents=True, exist_ok=True)
                self.sites[site] = LocalSite(self.root / site, site=site, prefix=site, extra_args=self._meshd_args,
                                             place=self._placer(site))
            self.segments.start()
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        # No duplicate address detection: a link is fully usable (IPv6 link-local included,
        # which mDNS clients such as Serf's write to) the moment build() returns, not 1-2 s later.
        ip("netns", "exec", namespace, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0",
           "net.ipv6.conf.all.accept_dad=0")

    def _attach(self, namespace: str, port: str, site: str, address: str) -> None:
        """A TAP in the site's segment, moved into `namespace` as eth0 (router: one per site)."""
        self._tap_count += 1
        tap = f"{self.prefix}t{self._tap_count}"
        fd = open_tap(tap)
        self.segments.add_port(port, fd, site)
        device = "eth0" if namespace != self.router else f"s{self._site_index[site]}"
        ip("link", "set", tap, "netns", namespace)
        ip("-n", namespace, "link", "set", tap, "name", device)
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
        ip("-n", namespace, "link", "set", device, "up")

    def _placer(self, site: str):
        def place(node: LocalNode) -> None:
            host = self.hosts[node.name]  # LocalSite names nodes "<site>-<j>", as the hosts are
            node.ip, node.command_prefix = host.address, host.exec_prefix()
            host.node = node
        return place

    # --- meshd ---------------------------------------------------------------------------

    def start_site(self, site: str, timeout: float = 60.0) -> LocalSite:
        """Found the site on its first host; every other host joins with its own token,
        finding the site by mDNS."""
        self.sites[site].found(timeout)
        return self._join_the_rest(site, timeout)

    def _join_the_rest(self, site: str, timeout: float) -> LocalSite:
        """Every host of `site` but its founder joins it with its own token, by mDNS."""
        local = self.sites[site]
        for _ in range(self._counts[site] - 1):
            local.join(timeout=timeout)
        return local

    def start_site_in_mesh(self, site: str, via: str, timeout: float = 60.0) -> LocalSite:
        """Found `site` inside the mesh of host `via` (another site): a founder token made on
        `via`, used by the site's first host with `--peer` (mDNS does not cross the router);
        the other hosts join it by mDNS like in `start_site`."""
        local = self.sites[site]
        token = self.call(via, "token_create", site=site, ttl=None, new_site=True)["token"]
        address = next(n["address"] for n in self.call(via, "nodes", site=None) if n["name"] == via)
        first = local.add_node(extra_args=("--peer", address))
        first.start(join=token)
        wait_for(lambda: (first.try_call("status") or {}).get("role") == "leader", timeout,
                 what=f"{first.name} to found site {site}")
        local.wait_ready(first, timeout)
        return self._join_the_rest(site, timeout)

    def isolate_site(self, site: str) -> None:
        """Cut `site` off from every other site (its link to the router goes down); inside
        the site nothing changes."""
        ip("-n", self.router, "link", "set", f"s{self._site_index[site]}", "down")

    def reconnect_site(self, site: str) -> None:
        ip("-n", self.router, "link", "set", f"s{self._site_index[site]}", "up")

    def node(self, host: str) -> LocalNode:
        node = self.hosts[host].node
        if node is None:
            raise KeyError(f"no daemon was started on {host}")
        return node

    def call(self, host: str, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        return self.node(host).call(cmd, timeout=timeout, **args)

    def workload_processes(self, host: str) -> int:
        """Workload processes (the apps' `sleep`) really running under the daemon on `host`."""
        node = self.node(host)
        if not node.alive:
            return 0
        try:
            children = psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        return sum(1 for p in children if p.name() == "sleep" and p.status() != psutil.STATUS_ZOMBIE)

    def meshctl(self, host: str, *args: str, timeout: float = 30.0,
                input_text: str | None = None) -> subprocess.CompletedProcess:
        """The operator's command line against the daemon on `host` (its admin socket is a
        file, reachable from outside the namespace)."""
        return subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", self.node(host).socket, *args],
                              capture_output=True, text=True, timeout=timeout, input=input_text)

    def meshctl_json(self, host: str, *args: str) -> Any:
        done = self.meshctl(host, *args, "--json")
        if done.returncode != 0:
            raise RuntimeError(f"meshctl {' '.join(args)} on {host}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def spawn(self, host: str, argv: list[str], env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen:
        """Run another program on `host` (in its namespace); `close()` kills it."""
        proc = subprocess.Popen([*self.hosts[host].exec_prefix(), *argv], stdin=subprocess.DEVNULL,
                                env=None if env is None else {**os.environ, **env}, **popen)
        self._spawned.append(proc)
        return proc

    # --- faults --------------------------------------------------------------------------

    def partition(self, groups: list[list[str]]) -> None:
        """Cut the hosts into groups that cannot reach each other (a host in no group is cut
        off alone; the router reaches every group)."""
        sides = {host: i for i, group in enumerate(groups) for host in group}
        for n, host in enumerate(h for h in self.hosts if h not in sides):
            sides[host] = len(groups) + n
        self.segments.set(groups=sides)

    def heal(self) -> None:
        self.segments.set(groups={})

    def netem(self, host: str, delay: float = 0.0, loss: float = 0.0) -> None:
        """Delay (s) and loss (probability) on everything `host` sends."""
        links = dict(self.segments.impairments.links)
        links[host] = Link(delay, loss)
        self.segments.set(links=links)

    def clear_netem(self) -> None:
        self.segments.set(links={})

    def kill(self, host: str) -> None:
        self.node(host).kill()

    def restart(self, host: str) -> None:
        """Start the daemon again on its data dir (it resumes its membership)."""
        node = self.node(host)
        if node.alive:
            node.terminate()
        node.start()

    def pause(self, host: str) -> None:
        self.node(host).pause()

    def resume(self, host: str) -> None:
        self.node(host).resume()

    # --- teardown ------------------------------------------------------------------------

    def keep_logs(self, dest: Path) -> Path:
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for log in self.root.rglob("*.log"):
            shutil.copy2(log, dest / log.name)
        return dest

    def close(self) -> None:
        for proc in self._spawned:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._spawned.clear()
        for site in self.sites.values():
            site.close()
        self.sites.clear()
        self.segments.close()
        for namespace in reversed(self.namespaces):
            ip("netns", "del", namespace, check=False)
        self.namespaces.clear()
        atexit.unregister(self.close)
