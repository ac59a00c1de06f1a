"""A member whose data dir is on a small tmpfs that fills up (a real filesystem out of space,
as an SD card full of logs or a model that did not fit): the daemon stays up and keeps
answering reads, refuses with a clear error the writes it could not make durable, takes
none of the site's entries meanwhile (so it acknowledges nothing it did not store), and
once space is freed catches up on its own: nothing the site acknowledged is lost."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from meshd.io.adminclient import AdminError
from meshd.io.localsite import sleeper_app, wait_for

pytestmark = pytest.mark.system

TMPFS_SIZE = "32m"  # room for a member's data dir and its logs, small enough to fill in a moment


def fill(directory) -> int:
    """Write a file into `directory` until its filesystem refuses (ENOSPC); its size."""
    written = 0
    with open(directory / "filler", "wb") as out:
        chunk = b"\0" * (1 << 20)
        while True:
            try:
                written += out.write(chunk)
                out.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    return written


def view(node):
    apps, allocs = node.try_call("apps"), node.try_call("allocs")
    if apps is None or allocs is None:
        return None
    return sorted((a["app"], a["version"]) for a in apps), sorted(a["alloc_id"] for a in allocs)


def test_a_member_on_a_full_disk_stays_up_refuses_writes_and_catches_up_when_space_returns(make_site):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    site = make_site()
    site.found()
    site.join()
    victim = site.add_node()
    victim.data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(victim.data_dir)], check=True)
    try:
        victim.start(join=site.token())
        site.wait_ready(victim, 30)
        leader = site.leader()
        leader.call("deploy", spec_toml=sleeper_app("before", 3), wait=True, timeout=30)
        wait_for(lambda: view(victim) == view(leader), 20, what="the member in step")

        fill(victim.data_dir)
        # the site goes on without it, and acknowledges what a majority stored
        leader.call("deploy", spec_toml=sleeper_app("during", 2), wait=True, timeout=30)
        with pytest.raises(AdminError, match="is full"):
            victim.call("deploy", spec_toml=sleeper_app("refused", 1))
        wait_for(lambda: victim.call("status").get("disk_full"), 20, what="the member saying its disk is full")
        time.sleep(3)  # the site's entries keep coming at it
        assert victim.alive and victim.call("status")["role"] == "follower"
        assert victim.call("apps") is not None  # reads go on
        said = victim.log_text()
        assert "Traceback" not in said and "disk is full" in said, said[-3000:]

        (victim.data_dir / "filler").unlink()
        wait_for(lambda: not victim.call("status").get("disk_full") and view(victim) == view(leader), 30,
                 what="the member caught up")
        victim.call("deploy", spec_toml=sleeper_app("after", 1), wait=True, timeout=30)
        apps = {a["app"] for a in leader.call("apps")}
        assert {"before", "during", "after"} <= apps and "refused" not in apps
        wait_for(lambda: view(victim) == view(leader), 20, what="the member in step again")
    finally:
        victim.terminate()
        subprocess.run(["umount", "-l", str(victim.data_dir)], check=False)
