"""Several real `meshd run` processes on one machine (loopback), for the demo, tests and benchmarks.

Invariants:
- Every daemon is a separate OS process with its own data dir and admin socket; they find
  each other by mDNS on the loopback interface unless static peers are given.
- `close()` stops every process it started (SIGTERM, then SIGKILL) and kills any workload
  process group left behind by a SIGKILLed daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from meshd.io.adminclient import AdminError, AdminUnavailable, admin_call_sync
from meshd.io.supervisor import kill_leftover_workloads

LOOPBACK = "127.0.0.1"



def _who_runs() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "root" if os.geteuid() == 0 else "nobody"


WHO_RUNS = _who_runs()

class LocalNode:
    def __init__(self, name: str, data_dir: Path, site: str = "demo", extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        self.name = name
        self.data_dir = data_dir
        self.site = site
        self.extra_args = tuple(extra_args)
        self.env = env
        self.cwd: str | None = None  # where the process starts (python -m imports from there first)
        self.proc: subprocess.Popen | None = None
        self.socket = str(data_dir / "admin.sock")
        self.log_path = data_dir.parent / f"{name}.log"
        self.started_at = 0.0
        self.ip = LOOPBACK  # where it listens and what it advertises
        self.command_prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS) to run it elsewhere

    def start(self, join: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [*self.command_prefix, sys.executable, "-m", "meshd.cli.meshd_main", "run",
                "--data-dir", str(self.data_dir), "--site", self.site, "--name", self.name,
                "--listen", f"{self.ip}:0", "--advertise", self.ip,
                "--metrics", f"{self.ip}:0",  # many daemons on one host: a port each
                # workloads as whoever runs the site (tests, the demo), not the package's user
                "--workload-user", WHO_RUNS,
                *self.extra_args, *extra_args]
        if join:
            args += ["--join", join]
        env = dict(os.environ)
        env.update(self.env or {})
        log = open(self.log_path, "ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=self.cwd)
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def call(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        return admin_call_sync(self.socket, cmd, args, timeout=timeout)

    def try_call(self, cmd: str, **args: Any) -> Any:
        try:
            return self.call(cmd, timeout=3.0, **args)
        except (AdminError, AdminUnavailable, OSError, TimeoutError):
            return None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        kill_leftover_workloads(self.data_dir)

    def pause(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_leftover_workloads(self.data_dir)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def sleeper_app(name: str, replicas: int) -> str:
    """The spec (TOML) of an app whose replicas just sleep: for tests and benchmarks."""
    return f'[app]\nname = "{name}"\nreplicas = {replicas}\ncommand = ["sleep", "3600"]\n'


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class LocalSite:
    def __init__(self, root: Path, site: str = "demo", prefix: str = "node", extra_args: tuple[str, ...] = (),
                 place: Callable[[LocalNode], None] | None = None):
        self.root = Path(root)
        self.site = site
        self.prefix = prefix
        self.extra_args = tuple(extra_args)
        self.place = place  # puts a new node somewhere other than loopback (its host's namespace)
        self.nodes: list[LocalNode] = []

    def add_node(self, extra_args: tuple[str, ...] = ()) -> LocalNode:
        name = f"{self.prefix}-{len(self.nodes) + 1}"
        node = LocalNode(name, self.root / name, site=self.site, extra_args=self.extra_args + tuple(extra_args))
        if self.place is not None:
            self.place(node)
        self.nodes.append(node)
        return node

    def found(self, timeout: float = 20.0) -> LocalNode:
        node = self.add_node()
        node.start()
        wait_for(lambda: (node.try_call("status") or {}).get("role") == "leader", timeout, what=f"{node.name} to lead")
        self.wait_ready(node, timeout)  # its own first report committed: the site is settled
        return node

    def token(self, via: LocalNode | None = None, ttl: int | None = None) -> str:
        via = via or self.any_alive()
        return via.call("token_create", site=None, ttl=ttl)["token"]

    def join(self, extra_args: tuple[str, ...] = (), wait: bool = True, timeout: float = 30.0) -> LocalNode:
        token = self.token()
        node = self.add_node(extra_args)
        node.start(join=token)
        if wait:
            self.wait_ready(node, timeout)
        return node

    def start(self, count: int, timeout: float = 30.0) -> None:
        self.found(timeout)
        for _ in range(count - 1):
            self.join(timeout=timeout)

    def grow(self, count: int, timeout: float = 30.0) -> list[LocalNode]:
        """Bring the site to `count` nodes, each ready before the next joins: founds it when it
        has none, then joins members one at a time. Returns the nodes it added."""
        added = []
        if not self.nodes:
            added.append(self.found(timeout))
        while len(self.nodes) < count:
            added.append(self.join(timeout=timeout))
        return added

    def any_alive(self) -> LocalNode:
        for node in self.nodes:
            if node.alive and node.try_call("status"):
                return node
        raise RuntimeError("no live node")

    def leader(self) -> LocalNode | None:
        for node in self.nodes:
            if node.alive and (node.try_call("status") or {}).get("role") == "leader":
                return node
        return None

    def wait_leader(self, timeout: float = 15.0, exclude: LocalNode | None = None) -> LocalNode:
        def find():
            leader = self.leader()
            return leader if leader is not None and leader is not exclude else None
        return wait_for(find, timeout, what="a leader")

    def node_state(self, name: str, via: LocalNode | None = None) -> str | None:
        via = via or self.leader() or next((n for n in self.nodes if n.alive and n.try_call("status")), None)
        if via is None:  # nobody answers yet (still starting)
            return None
        rows = via.try_call("nodes") or []
        return next((r["state"] for r in rows if r["name"] == name), None)

    def wait_ready(self, node: LocalNode, timeout: float = 30.0) -> None:
        def ready():
            if not node.alive:
                raise RuntimeError(f"{node.name} exited:\n{node.log_text()[-3000:]}")
            return self.node_state(node.name) == "ready"
        wait_for(ready, timeout, what=f"{node.name} to be ready")

    def allocs(self, app: str | None = None, via: LocalNode | None = None) -> list[dict]:
        via = via or self.any_alive()
        return via.call("allocs", app=app, node=None)

    def running(self, app: str, via: LocalNode | None = None) -> list[dict]:
        return [a for a in (self.allocs(app, via) or []) if a["state"] == "running" and a["desired"] == "run"]

    def close(self) -> None:
        for node in self.nodes:
            node.terminate()

    def dump_logs(self) -> str:
        return "\n".join(f"===== {n.name} =====\n{n.log_text()[-6000:]}" for n in self.nodes)


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
