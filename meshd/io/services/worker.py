"""This node as a worker: it runs what meshd.node.worker says, reports its allocations and
resources through Raft when there is news (meshd.reporting), and leaves when it was revoked.

Invariants:
- Reports go out only when something changed (an allocation's state, resources moved a
  step, a full resend every FULL_REPORT_PERIOD of what the site does not show). They are not
  keep-alives: a non-voter keeps its lease with beats (meshd.io.services.beats).
- A revoked node stops every workload, writes the marker that keeps it from starting again
  on this data dir, and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Mapping

import psutil
import trio

from meshd import commands as cmds
from meshd.commands import Ok
from meshd.exitcodes import EXIT_REVOKED
from meshd.io import devices, workrecord
from meshd.io.attester import boot_id, started_digest
from meshd.io.context import FatalStartupError, NodeContext
from meshd.io.identity import write_revoked_marker
from meshd.io.raft import CommandFailed
from meshd.io.supervisor import remove_dirs
from meshd.node import effects as fx
from meshd.node.worker import Worker
from meshd.reporting import ReportSchedule, reflected_in, resources_moved
from meshd.state import ADMIN_LEFT, ADMIN_REVOKED, SiteState

log = logging.getLogger("meshd.daemon")

# Allocation reports are sent when they change; a full resend this often repairs any report
# that a leader change swallowed.
FULL_REPORT_PERIOD = 10.0
# How often a node looks for news to report when the supervisor does not wake it first
# (resource moves are only seen by sampling, which is this slow anyway).
REPORT_CHECK_PERIOD = 2.0
# Every applied command wakes the supervisor sync; without one it looks this often anyway.
SUPERVISE_SAFETY_PERIOD = 5.0
# A report that did not commit (no leader yet, leader change) is retried after this.
REPORT_RETRY_DELAY = 0.1
# psutil sampling is cheap but not free; resources move slowly.
RESOURCE_SAMPLE_PERIOD = 2.0


class Expelled(FatalStartupError):
    """This node was revoked; the message says by whom and why. The daemon exits with it."""


class WorkerService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.core: Worker | None = None  # once the identity is known
        self._heartbeat_seq = int(time.time() * 1000)  # monotonic across restarts of this node
        self._reports = ReportSchedule(full_period=FULL_REPORT_PERIOD)
        self._resources: dict = {}
        self._resources_at = 0.0
        ctx.carry_out(fx.SetWorkloads, self._set_workloads)
        ctx.carry_out(fx.ForgetAllocs, self._forget)
        ctx.carry_out(fx.Expel, self._expelled)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.ctx.identity is not None and self.ctx.supervisor is not None
        self.core = Worker(self.ctx.identity.node_id, on_disk=self.ctx.supervisor.allocation_dirs(),
                           record=workrecord.load(self.ctx.data_dir) if self.ctx.recovering else None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._supervise_loop)
            nursery.start_soon(self._report_loop)
            task_status.started()

    async def _supervise_loop(self) -> None:
        """Run what meshd.node.worker says this node runs; leave when it was revoked."""
        ctx = self.ctx
        assert ctx.state_changed is not None and self.core is not None
        changes = ctx.state_changed.listener()
        while True:
            state = ctx.snapshot()
            await ctx.execute(self.core.step(state, ctx.revoked_notice,
                                             caught_up=ctx.raft is not None and ctx.raft.replayed,
                                             recovering=ctx.recovering))
            self._save_partners(state)
            await changes.wait_slot(SUPERVISE_SAFETY_PERIOD)

    async def _set_workloads(self, effect: fx.SetWorkloads) -> None:
        assert self.ctx.supervisor is not None
        self.ctx.supervisor.set_desired(effect.workloads)
        if not self.ctx.recovering:  # a record of what the site's state said, never of a record
            await trio.to_thread.run_sync(workrecord.save, self.ctx.data_dir, effect.workloads)

    async def _forget(self, effect: fx.ForgetAllocs) -> None:
        assert self.ctx.supervisor is not None
        dirs = self.ctx.supervisor.forget(effect.alloc_ids)
        if dirs:
            await trio.to_thread.run_sync(remove_dirs, dirs)
            log.info("allocation directories removed", extra={"allocs": len(dirs)})

    async def _report_loop(self) -> None:
        """Send a report through Raft whenever the schedule says there is news."""
        ctx = self.ctx
        assert ctx.identity is not None and ctx.reports_changed is not None and ctx.raft is not None
        news = ctx.reports_changed.listener()
        while True:
            status = ctx.raft.status
            if status.leader_address is not None:
                reports = ctx.supervisor.plain_reports() if ctx.supervisor else []
                now = time.monotonic()
                state = ctx.snapshot() if self._reports.full_due(now) else None
                report = self._reports.due(now, self._sample_resources(), reports,
                                           reflected_in(state.allocs.get) if state else None,
                                           self._site_has(state) if state else None)
                if report is not None and not report.needed:
                    self._reports.sent(now, report)  # the site shows all of it already
                elif report is not None:
                    self._heartbeat_seq += 1
                    command = cmds.Heartbeat(
                        node_id=ctx.identity.node_id, seq=self._heartbeat_seq,
                        reports=tuple(cmds.AllocReport.from_wire(r) for r in report.allocs),
                        resources=cmds.resources_from_wire(report.resources) if report.resources_moved else None,
                        # A reboot, or a restart into other software, makes the leader re-attest us.
                        boot_id=boot_id() if report.full else None,
                        software=started_digest() if report.full else None)
                    try:
                        result = await ctx.raft.submit(cmds.encode(command, cmds.Envelope(ts=time.time())),
                                                       timeout=max(ctx.config.lease, 1.0))
                        ctx.counted(command, result)
                        if isinstance(result, Ok):
                            self._reports.sent(now, report)
                            # Look again at once: changes made while the report was in
                            # flight woke nobody.
                            continue
                    except CommandFailed:
                        ctx.counted(command, None)
                    await trio.sleep(REPORT_RETRY_DELAY)
                    continue
            await news.wait_slot(REPORT_CHECK_PERIOD)

    def _site_has(self, state: SiteState) -> Callable[[Mapping[str, float]], bool]:
        """Whether the site's record of this node shows these resources (within a step), this
        boot and this software: then a full resend with no allocation to repair need not be sent."""
        assert self.ctx.identity is not None
        own = state.nodes.get(self.ctx.identity.node_id)

        def has(resources: Mapping[str, float]) -> bool:
            return own is not None and own.boot_id == boot_id() and own.software == started_digest() \
                and not resources_moved(dataclasses.asdict(own.resources), resources)
        return has

    def _sample_resources(self) -> dict:
        now = time.monotonic()
        if not self._resources or now - self._resources_at > RESOURCE_SAMPLE_PERIOD:
            cores = psutil.cpu_count() or 1
            busy = psutil.cpu_percent(interval=None) / 100.0
            mem = psutil.virtual_memory()
            limits = self.ctx.supervisor.limits if self.ctx.supervisor is not None else None
            held = self.ctx.supervisor.devices if self.ctx.supervisor is not None else None
            if held is not None:
                held.refresh(devices.found(self.ctx.config.devices))  # plugged in or out since
            self._resources = {"cpu_total": float(cores), "cpu_free": round(cores * (1 - busy), 2),
                               "mem_total_mb": mem.total // 2**20, "mem_free_mb": mem.available // 2**20,
                               "enforces": sorted(limits.enforceable) if limits is not None else [],
                               "cgroup": limits.hierarchy.version if limits is not None and limits.enforceable else 0,
                               "reserved_cpu": self.ctx.config.reserve_cpu,
                               "reserved_mem_mb": self.ctx.config.reserve_memory_mb,
                               "devices": devices.counts(held.devices) if held is not None else {},
                               "oom_kills": self.ctx.supervisor.counts["oom_kills"] if self.ctx.supervisor else 0}
            self._resources_at = now
        return self._resources

    def _save_partners(self, state: SiteState) -> None:
        """Remember the voters' Raft addresses, so a restart finds the site without mDNS."""
        ctx = self.ctx
        if ctx.membership is None or not state.nodes:
            return
        own = f"{ctx.advertise_ip}:{ctx.raft_port}"
        partners = sorted(n.raft_address for n in state.nodes.values()
                          if n.voter and n.admin not in (ADMIN_LEFT, ADMIN_REVOKED) and n.raft_address != own)
        if partners != sorted(ctx.membership.partners):
            ctx.membership.partners = partners
            ctx.membership.save(ctx.data_dir)

    async def _expelled(self, effect: fx.Expel) -> None:
        """This node was revoked: stop every workload, remember it, and exit. A restart on
        this data dir refuses to run; the node key is refused by every member anyway."""
        assert self.ctx.supervisor is not None
        log.critical(effect.reason)
        await self.ctx.supervisor.stop_all()
        write_revoked_marker(self.ctx.data_dir, effect.reason)
        raise Expelled(effect.reason + "; wipe the data dir to start this device over as a new node", EXIT_REVOKED)
