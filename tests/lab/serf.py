"""Serf (HashiCorp's SWIM gossip agent, Debian package `serf`) on lab hosts: the baseline meshd's
membership is measured against.

Each agent runs on its host's address with Serf's defaults (the `lan` profile) and finds the
others by mDNS (`-discover`), as meshd does, so neither side is handed its peers. What an agent
knows is read from its log as the lines arrive, stamped with the reader's clock:
`serf: EventMemberJoin: <name> <addr>` and `serf: EventMemberFailed: <name> <addr>` are printed
by the Serf library the moment its member list changes. (Event *handlers* run later: the agent
coalesces member events for a quiescent second, so timing handlers would charge Serf a second
it does not need.)

Invariants: every agent is started through `Lab.spawn`, so the lab's `close()` kills it; its
output is drained as it comes (tests.lab.output), so the agent never blocks on a full pipe.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from tests.lab.lab import Lab
from tests.lab.output import StampedOutput

SERF_PORT = 7946  # Serf's default gossip port; each host has its own address, so no clash
RPC_ADDRESS = "127.0.0.1:7373"  # per namespace: every host has its own loopback
CLUSTER = "meshd-lab"  # the mDNS cluster name the agents look for each other under

_EVENT = re.compile(r"serf: (EventMemberJoin|EventMemberFailed|EventMemberLeave): (\S+) (\S+)")


@dataclass(frozen=True)
class MemberEvent:
    at: float  # time.monotonic() when the line was read
    kind: str  # "join" | "failed" | "leave"
    member: str
    address: str


def parse_event(line: str, at: float) -> MemberEvent | None:
    """The member event a line of the agent's log reports, or None."""
    found = _EVENT.search(line)
    if found is None:
        return None
    kind = {"EventMemberJoin": "join", "EventMemberFailed": "failed", "EventMemberLeave": "leave"}[found[1]]
    return MemberEvent(at, kind, found[2], found[3])


def require_serf() -> str:
    path = shutil.which("serf")
    if path is None:
        raise RuntimeError("serf is not installed (apt-get install serf)")
    return path


class SerfAgent:
    def __init__(self, lab: Lab, host: str):
        self.lab = lab
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.output: StampedOutput[MemberEvent] | None = None

    def start(self) -> None:
        address = self.lab.hosts[self.host].address
        self.proc = self.lab.spawn(self.host, [
            require_serf(), "agent", f"-node={self.host}", f"-bind={address}:{SERF_PORT}",
            f"-rpc-addr={RPC_ADDRESS}", f"-discover={CLUSTER}", "-iface=eth0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output = StampedOutput(self.proc, parse_event, f"serf on {self.host}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_event(self, kind: str, member: str, after: float, timeout: float = 30.0) -> float:
        """When this agent first reported `kind` for `member` at or after `after` (monotonic)."""
        event = self.output.wait(lambda e: e.kind == kind and e.member == member and e.at >= after, timeout,
                                 f"{kind} of {member}")
        return event.at

    def members(self) -> dict[str, str]:
        """name -> status (alive, failed, left) as the agent's own CLI lists them."""
        out = subprocess.run([*self.lab.hosts[self.host].exec_prefix(), require_serf(), "members",
                              f"-rpc-addr={RPC_ADDRESS}"], capture_output=True, text=True, timeout=10, check=True)
        return {cols[0]: cols[2] for cols in (line.split() for line in out.stdout.splitlines()) if len(cols) >= 3}
