"""What the node core asks its runtime to do. Plain frozen values: a transcript prints them,
the runtime (meshd.io) carries them out.

Invariants:
- An effect names everything its execution needs; the runtime decides nothing about it
  beyond how to do it (which socket, which thread, fresh randomness).
- A `Commit` may carry `then`: a pure function of the command's outcome (Ok | Refused) and
  of the state right after it, returning the effects that follow. The runtime calls it
  exactly once when the command committed (applied, or refused by the state machine); a
  command whose outcome is unknown
  (no commit: a leader change, no quorum) calls nothing, and the duty that asked for it
  looks again on its next pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

from meshd.commands import Command, Result
from meshd.state import ArtifactRef, HealthCheck, NodeRecord, ResourceRequest, SiteState


@dataclass(frozen=True)
class Commit:
    """Submit a command through Raft (the runtime adds the request id and timestamp)."""
    command: Command
    then: Callable[[Result, SiteState], Sequence["Effect"]] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AddVoter:
    """Grow the Raft configuration by this member (one configuration change at a time)."""
    address: str
    name: str


@dataclass(frozen=True)
class RemoveVoter:
    """Take a member that left or was revoked out of the Raft configuration."""
    address: str
    name: str
    why: str


@dataclass(frozen=True)
class Emit:
    """An event for `meshctl events` and the log."""
    kind: str
    message: str
    data: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TellRevoked:
    """Hand a revoked node the root-signed list that names it (best effort)."""
    node: NodeRecord
    revocations: dict


@dataclass(frozen=True)
class DistributeSecret:
    """Draw a new Raft secret under `epoch`, send it to `members` over mutual TLS, then
    switch to it here."""
    epoch: int
    members: tuple[NodeRecord, ...]


@dataclass(frozen=True)
class PromoteVoter:
    """Hand a member the site made a voter (in the place of a removed one) what a voter
    holds (the mesh root key) over mutual TLS; it restarts its Raft as a voter."""
    node: NodeRecord


@dataclass(frozen=True)
class RenewCertificate:
    """Issue a fresh membership certificate to a member whose evidence just verified."""
    node: NodeRecord


@dataclass(frozen=True)
class Workload:
    """One allocation this node must run."""
    alloc_id: str
    app: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    restart_policy: str
    health: HealthCheck = HealthCheck()  # how its health is judged (meshd.health)
    site: str = ""  # the site it runs in (MESHD_SITE in its environment)
    limits: ResourceRequest = ResourceRequest()  # enforced while it runs (meshd.io.cgroups)
    user: str = ""  # who it runs as ("": the node's workload-user)
    artifacts: tuple[ArtifactRef, ...] = ()  # on this node and verified before it starts


@dataclass(frozen=True)
class SetWorkloads:
    """Run exactly these allocations from now on."""
    workloads: tuple[Workload, ...]


@dataclass(frozen=True)
class ForgetAllocs:
    """The site forgot these allocations of this node (finished, beyond the history kept):
    remove what this node keeps of them (their directory and logs)."""
    alloc_ids: tuple[str, ...]


@dataclass(frozen=True)
class Expel:
    """This node was revoked: stop every workload, remember it, exit."""
    reason: str


@dataclass(frozen=True)
class RebuildState:
    """This member's history is not the site's (a checkpoint found it: SiteState.diverged):
    set its Raft data aside and take the site's state from the leader again."""
    reason: str


Effect = Union[Commit, AddVoter, RemoveVoter, Emit, TellRevoked, DistributeSecret, PromoteVoter, RenewCertificate,
               SetWorkloads, ForgetAllocs, Expel, RebuildState]
