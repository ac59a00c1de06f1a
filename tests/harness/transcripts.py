"""The commands of the transcript files (tests/harness/testdata/*.txt) on a SimSite."""

from __future__ import annotations

import hashlib

from tests.harness.datadriven import split
from meshd.twin.site import DIGEST, MODIFIED_DIGEST, SimSite, node_names


class Transcript:
    def __init__(self) -> None:
        self.site = SimSite()

    def execute(self, command: str) -> str:
        site = self.site
        site.out = []
        name, args, kw = split(command)
        handler = getattr(self, "do_" + name.replace("-", "_"), None)
        if handler is None:
            raise ValueError(f"unknown transcript command {name!r}")
        handler(args, kw)
        return node_names(site, "\n".join(site.out))

    def do_found(self, args, kw) -> None:
        self.site.found(args[0])

    def do_token(self, args, kw) -> None:
        self.site.token(args[0], via=kw.get("via"), ttl=float(kw.get("ttl", 3600)))

    def do_join(self, args, kw) -> None:
        self.site.join(args[0], kw["token"], kw["via"].split(","),
                       give_up_after=float(kw["timeout"]) if "timeout" in kw else None)

    def do_tick(self, args, kw) -> None:
        for _ in range(int(kw.get("n", 1))):
            self.site.tick(float(kw.get("dt", 0.1)))

    def do_settle(self, args, kw) -> None:
        ticks = self.site.settle()
        if "quiet" not in args:
            self.site.say(f"(settled after {ticks} ticks)")

    def do_deploy(self, args, kw) -> None:
        """deploy APP [replicas=N] [v=TAG] [health=good|bad|crash] [max_parallel=N] [canary=N]
        [min_healthy=S] [healthy_deadline=S] [progress_deadline=S] [auto_revert=false] [auto_promote=true]"""
        from meshd import commands as cmds, spec as specmod
        text = (f'[app]\nname = "{args[0]}"\nreplicas = {kw.get("replicas", 1)}\n'
                f'command = ["sleep", "{kw.get("v", "3600")}"]\n')
        if "health" in kw:
            text += f'[app.health]\nkind = "exec"\ncommand = ["sim-health", "{kw["health"]}"]\n'
        update = {key: kw[name] for name, key in (
            ("max_parallel", "max_parallel"), ("canary", "canary"), ("min_healthy", "min_healthy_s"),
            ("healthy_deadline", "healthy_deadline_s"), ("progress_deadline", "progress_deadline_s"),
            ("auto_revert", "auto_revert"), ("auto_promote", "auto_promote")) if name in kw}
        if update:
            text += "[app.update]\n" + "".join(f"{k} = {v}\n" for k, v in update.items())
        spec = specmod.parse_app_toml(text)
        via = self.site.node(kw["via"]) if "via" in kw else self.site.leader_node()
        self._commit(cmds.SubmitApp(spec=spec, actor="operator"), via)

    def do_rollout(self, args, kw) -> None:
        """rollout APP promote|pause|resume|cancel [version=V]: the operator's move."""
        from meshd import commands as cmds
        leader = self.site.leader_node()
        record = leader.view().apps[args[0]]
        version = int(kw.get("version", record.version))
        self._commit(cmds.Rollout(app=args[0], version=version, action=args[1], actor="operator"), leader)

    def do_deployments(self, args, kw) -> None:
        self.site.deployments(args[0], kw.get("via"))

    def do_history(self, args, kw) -> None:
        self.site.history(args[0], kw.get("via"))

    def do_stop(self, args, kw) -> None:
        from meshd import commands as cmds
        self._commit(cmds.StopApp(app=args[0], actor="operator"), self.site.leader_node())

    def do_drain(self, args, kw) -> None:
        from meshd import commands as cmds
        self._commit(cmds.Drain(node=args[0], actor="operator"), self.site.leader_node())

    def do_undrain(self, args, kw) -> None:
        from meshd import commands as cmds
        self._commit(cmds.Undrain(node=args[0], actor="operator"), self.site.leader_node())

    def _commit(self, command, via) -> None:
        from meshd.twin.site import describe_command, describe_result
        result = self.site.commit(command, via=via)
        self.site.say(f"{via.name if via else '?'}: {describe_command(command)} -> {describe_result(result)}")

    def do_kill(self, args, kw) -> None:
        node = self.site.kill(args[0])
        self.site.say(f"{node.name} killed")

    def do_restart(self, args, kw) -> None:
        self.site.restart(args[0])

    def do_partition(self, args, kw) -> None:
        for name in args:
            self.site.node(name).reachable = False
        self.site.say(f"{' '.join(args)} cut off")

    def do_heal(self, args, kw) -> None:
        for name in args:
            self.site.node(name).reachable = True
        self.site.say(f"{' '.join(args)} reachable")

    def do_elect(self, args, kw) -> None:
        site = self.site
        if site.leader and site.leader in site.nodes:
            site.nodes[site.leader].leading.stepped_down()
        site.leader, site.term = args[0], site.term + 1
        site.say(f"{args[0]} leads (term {site.term})")

    def do_revoke(self, args, kw) -> None:
        self.site.revoke(args[0], by=kw["by"], reason=kw.get("reason", ""))

    def do_revoke_race(self, args, kw) -> None:
        """Two revocations made from the same view (two operators at once): the second one's
        list does not supersede the first's, so it is refused, and nothing follows it."""
        from meshd.node import trust
        site = self.site
        member = site.node(kw["by"])
        first, second = (member.state.nodes[site.node(n).node_id] for n in args)
        commands = [trust.revocation(member.state, r, f"operator@{member.name}", "", site.root_key, site.wall)
                    for r in (first, second)]
        for record, command in zip((second, first), reversed(commands)):
            site.commit_revocation(member, record, command)

    def do_reattest(self, args, kw) -> None:
        evidence = kw.get("evidence", "good")
        digest = {"good": DIGEST, "modified": MODIFIED_DIGEST, "forged": DIGEST,
                  "unknown": hashlib.sha256(b"a build nobody allowed").hexdigest()}[evidence]
        self.site.reattest(args[0], digest, revoked_meanwhile="revoked-meanwhile" in args, forged=evidence == "forged",
                           clock_skew=float(kw.get("clock", 0)))

    def do_allow(self, args, kw) -> None:
        self.site.allow({"good": DIGEST, "modified": MODIFIED_DIGEST}[kw["digest"]])

    def do_attestation_due(self, args, kw) -> None:
        self.site.attestation_due()

    def do_take_in(self, args, kw) -> None:
        self.site.take_in(args[0], kw["from"], int(kw.get("replicas", 1)), tuple(kw["targets"].split(",")),
                          int(kw["version"]), stopped="stopped" in args,
                          spec_name="wrong-name" if "bad-spec" in args else None)

    def do_allocs(self, args, kw) -> None:
        self.site.allocs(kw.get("via"))

    def do_members(self, args, kw) -> None:
        self.site.members(kw.get("via"))

    def do_apps(self, args, kw) -> None:
        self.site.apps(kw.get("via"))

    def do_processes(self, args, kw) -> None:
        self.site.processes()
