"""`meshd demo`: a real three-node site on loopback, an example app, and its state.

Each node is a separate `meshd run` process with a temporary data dir; nodes 2 and 3 join
with tokens and find the founder by mDNS on the loopback interface. The demo deploys an
example app, shows nodes/apps/allocations with the same tables `meshctl` prints, then keeps
the site running, showing what one replica prints, until Ctrl-C, SIGTERM, SIGHUP (its
terminal closed), a closed stdout (`meshd demo | head`) or `--duration`. However it ends, it
stops its daemons and their workloads first.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from meshd.cli import render
from meshd.io.localsite import LocalSite, wait_for
from meshd.io.supervisor import output_log

EXAMPLE_APP = """\
[app]
name = "hello-edge"
replicas = 3
command = ["python3", "-c", "import os, time\\nwhile True:\\n    print('hello from', os.environ['MESHD_ALLOC_ID'], flush=True)\\n    time.sleep(5)"]

[app.resources]
cpu = 0.1
memory_mb = 16

[app.restart]
policy = "always"
"""


# How often the demo looks at its daemons and at the replica's output.
POLL_PERIOD = 0.5


def say(text: str) -> None:
    print(text, flush=True)


class OutputTail:
    """New lines of one file since the last look (the replica's output log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(64 * 1024)
        except OSError:  # not created yet, or rotated away: look again later
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


def run_demo(nodes: int = 3, duration: float | None = None, keep: bool = False) -> int:
    root = Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    site = LocalSite(root, site="demo", prefix="demo")
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    stdout_closed = False
    try:
        say(f"meshd demo: {nodes} daemons on 127.0.0.1, data in {root}")
        t0 = time.monotonic()
        first = site.found()
        say(f"  {first.name} founded site 'demo' ({time.monotonic() - t0:.2f}s)")
        for _ in range(nodes - 1):
            t1 = time.monotonic()
            node = site.join()
            say(f"  {node.name} joined by mDNS with a one-time token ({time.monotonic() - t1:.2f}s)")
        spec = EXAMPLE_APP
        unenforced = sorted({c for row in first.call("nodes") for c in ("cpu", "memory")
                             if c not in (row.get("enforces") or ())})
        if unenforced:  # (not root, or no cgroup controllers): limits would keep it off every node
            say(f"  this machine cannot enforce {' and '.join(unenforced)} limits (cgroups need root): "
                "the example runs without [app.resources]")
            spec = EXAMPLE_APP[:EXAMPLE_APP.index("[app.resources]")] + EXAMPLE_APP[EXAMPLE_APP.index("[app.restart]"):]
        app_file = root / "hello-edge.toml"
        app_file.write_text(spec)
        result = first.call("deploy", spec_toml=spec, wait=False, timeout=None)
        say(f"  deployed {result['app']} v{result['version']} (spec: {app_file})")
        wait_for(lambda: len(site.running("hello-edge")) == 3, 30, what="3 replicas running")
        say("")
        say(render.table(first.call("nodes", site=None), render.NODE_COLUMNS))
        say("")
        say(render.table(first.call("apps"), render.APP_COLUMNS))
        say("")
        say(render.table(first.call("allocs", app=None, node=None), render.ALLOC_COLUMNS))
        say("")
        say(f"Try: meshctl --socket {first.socket} status")
        say(f"     meshctl --socket {first.socket} logs <ALLOC>")
        say("Running" + (f" for {duration:g}s" if duration else " until Ctrl-C") + "; one replica's output:")
        shown = site.running("hello-edge")[0]
        holder = next(n for n in site.nodes if n.name == shown["node"])
        output = OutputTail(output_log(holder.data_dir, shown["alloc_id"]))
        deadline = time.monotonic() + duration if duration else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(POLL_PERIOD)
            for line in output.new_lines():
                say(f"  {shown['alloc_id'][:8]}@{holder.name} | {line}")
            dead = [n.name for n in site.nodes if not n.alive]
            if dead:
                say(f"error: daemon(s) exited: {', '.join(dead)}")
                return 1
    except KeyboardInterrupt:
        interrupted = True
    except BrokenPipeError:  # whoever read our output went away: nobody is watching
        stdout_closed = interrupted = True
    except Exception as e:
        print(f"error: demo failed: {e}", file=sys.stderr)
        print(site.dump_logs(), file=sys.stderr)
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):  # the clean-up is not cut short
            signal.signal(signum, signal.SIG_IGN)
        if stdout_closed:
            _silence_stdout()
        else:
            try:
                say("stopping the demo site...")
            except BrokenPipeError:
                _silence_stdout()
        site.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return 130 if interrupted else 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing more (the interpreter's last flush
    included) fails on the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
