"""Revocation benchmark: `meshctl revoke` -> the node is cut off at every member.

    python3 -m tests.bench.revoke [--runs 5] [--json bench-results/revoke.json]

Each run builds a fresh three-node site on loopback (real daemons), revokes a non-leader and
measures from the revoke request to the moment the revoked daemon has exited (it stopped its
workloads and itself) and every remaining member lists it as `revoked` (target <= 2 s).
Also reports when the leader had removed it from the Raft configuration. Table + JSON.
"""

from __future__ import annotations

import time

from meshd.io.localsite import LocalSite, wait_for
from tests.bench.report import run_site_benchmark

POLL_S = 0.02
TARGETS = {"revoke_cut_off_s": (2.0, "s"), "revoke_raft_removal_s": (None, "s")}


def one_run(site: LocalSite, samples: dict[str, list[float]]) -> None:
    site.start(3)
    leader = site.leader()
    victim = next(n for n in site.nodes if n is not leader)
    others = [n for n in site.nodes if n is not victim]
    t0 = time.monotonic()
    leader.call("revoke", node=victim.name, reason="benchmark")

    def cut_off():
        return (not victim.alive
                and all(site.node_state(victim.name, via=n) == "revoked" for n in others))
    wait_for(cut_off, 30, interval=POLL_S, what="revoked everywhere")
    samples["revoke_cut_off_s"].append(time.monotonic() - t0)
    wait_for(lambda: any("removed from the Raft voters" in e["message"] for e in leader.call("events")), 30,
             interval=POLL_S, what="Raft removal")
    samples["revoke_raft_removal_s"].append(time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    return run_site_benchmark("revoke", __doc__, one_run, TARGETS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
