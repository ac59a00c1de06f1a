"""`meshd demo`, the README's first command: a three-daemon site that shows a replica's
output, and stops every daemon and workload however it is ended (its terminal closing:
SIGHUP; whoever reads its output going away: a closed stdout)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.system

UP_TIMEOUT = 90  # three daemons found and join, and the app's replicas start
DOWN_TIMEOUT = 60  # the site stops: each daemon stops its workloads first


def processes_under(root: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " ".join((proc.info["environ"] or {}).values())
        except (psutil.Error, TypeError):
            continue
        if root in text:
            found.append(proc)
    return found


@pytest.mark.parametrize("ending", ["sighup", "closed stdout"])
def test_the_demo_shows_a_replicas_output_and_leaves_nothing_running_when_ended(ending):
    demo = subprocess.Popen([sys.executable, "-m", "meshd.cli.meshd_main", "demo", "--duration", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root = None
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        seen = []
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            assert line, f"the demo ended early: {seen[-5:]}"
            seen.append(line)
            if root is None and (m := re.search(r"data in (\S+)", line)):
                root = m.group(1)
            if re.search(r" \| \S+ hello from ", line):  # a line the replica printed (after its time)
                break
        else:
            pytest.fail(f"no replica output within {UP_TIMEOUT}s: {seen[-5:]}")
        assert root and processes_under(root)
        if ending == "sighup":
            demo.send_signal(signal.SIGHUP)
        else:
            demo.stdout.close()  # the next line the demo writes finds nobody reading
        assert demo.wait(timeout=DOWN_TIMEOUT) == 130
        assert processes_under(root) == [] and not Path(root).exists()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
