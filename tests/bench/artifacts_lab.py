"""An artifact to a site behind a thin uplink, in the lab (tests.lab): meshd against every
device fetching it from the origin (Nomad's `artifact` block: a URL and a checksum per client).

    python3 -m tests.bench.artifacts_lab [--runs 1] [--size-mb 100] [--uplink-mbit 20] [--hosts 5]
                                         [--json bench-results/artifacts_lab.json]

Each run builds a lab of two sites: `origin` (one host) and `edge` (--hosts hosts, one LAN),
their link through the lab's router limited to --uplink-mbit towards the edge (tc tbf on the
router's port to the edge segment). A --size-mb file is pushed on the origin host. Then:
- meshd: an app with one replica on each edge host and the file as its artifact is deployed
  from the origin; measured: the time until every edge host holds it verified (`artifact ls`
  on an edge host), and the bytes that crossed the uplink (tc's count on the router port,
  TCP and TLS included) as a multiple of the file (target <= 1.1);
- baseline, in the same run and over the same uplink: every edge host downloads the file from
  an HTTP server on the origin host at once (and checks its sha256), as each client of an
  orchestrator without peer sharing would; the same two figures.
Prints a table of medians and writes every sample to JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshd.io.localsite import wait_for
from tests.bench.report import report, showing_logs
from tests.lab.lab import Lab, ip

TARGETS = {
    "meshd_all_hold_s": (None, "s"),
    "meshd_uplink_x": (1.1, "x size"),
    "baseline_all_hold_s": (None, "s"),
    "baseline_uplink_x": (None, "x size"),
}
# The router's queue: a quarter second of the uplink, as a real modem buffers.
TBF_LATENCY = "250ms"


def uplink_bytes(lab: Lab) -> int:
    """Bytes the router sent towards the edge site since the limit was set (tc's count)."""
    shown = subprocess.run(["ip", "netns", "exec", lab.router, "tc", "-s", "qdisc", "show", "dev",
                            f"s{lab._site_index['edge']}"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Sent (\d+) bytes", shown)
    return int(match.group(1)) if match else 0


def limit_uplink(lab: Lab, mbit: float) -> None:
    device = f"s{lab._site_index['edge']}"
    ip("netns", "exec", lab.router, "tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{mbit}mbit",
       "burst", "64kb", "latency", TBF_LATENCY)


def one_run(root: Path, index: int, args, samples: dict) -> None:
    lab = Lab(root / f"lab{index}", {"origin": 1, "edge": args.hosts}).build()
    with showing_logs(lab):
        lab.start_site("origin")
        lab.start_site_in_mesh("edge", via="origin-1")
        blob = root / f"blob{index}"
        blob.write_bytes(os.urandom(args.size_mb << 20))
        size = blob.stat().st_size
        want = hashlib.sha256(blob.read_bytes()).hexdigest()
        digest = lab.meshctl_json("origin-1", "artifact", "push", str(blob))["digest"]
        spec = root / f"app{index}.toml"
        spec.write_text(f'[app]\nname = "use"\nreplicas = {args.hosts}\nsites = ["edge"]\nuser = "root"\n'
                        f'command = ["sleep", "3600"]\n[[app.artifact]]\nname = "blob"\ndigest = "{digest}"\n')
        limit_uplink(lab, args.uplink_mbit)
        before, started = uplink_bytes(lab), time.monotonic()
        done = lab.meshctl("origin-1", "deploy", str(spec))
        assert done.returncode == 0, done.stderr

        def all_hold() -> bool:
            rows = lab.meshctl_json("edge-1", "artifact", "ls")
            return bool(rows) and len(rows[0]["holders"]) == args.hosts
        wait_for(all_hold, 3600, interval=0.5, what="every edge host holding the artifact")
        samples["meshd_all_hold_s"].append(time.monotonic() - started)
        samples["meshd_uplink_x"].append((uplink_bytes(lab) - before) / size)

        # Baseline: every edge host fetches the file from the origin by HTTP at once.
        origin = lab.hosts["origin-1"].address
        lab.spawn("origin-1", [sys.executable, "-m", "http.server", "8089", "--bind", origin, "--directory",
                               str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        fetch = ("import hashlib, sys, urllib.request\n"
                 "h = hashlib.sha256()\n"
                 "with urllib.request.urlopen(sys.argv[1]) as r:\n"
                 "    while chunk := r.read(1 << 20): h.update(chunk)\n"
                 "sys.exit(0 if h.hexdigest() == sys.argv[2] else 1)\n")
        before, started = uplink_bytes(lab), time.monotonic()
        clients = [lab.spawn(f"edge-{j}", [sys.executable, "-c", fetch, f"http://{origin}:8089/{blob.name}", want])
                   for j in range(1, args.hosts + 1)]
        codes = [c.wait(timeout=3600) for c in clients]
        assert codes == [0] * args.hosts, codes
        samples["baseline_all_hold_s"].append(time.monotonic() - started)
        samples["baseline_uplink_x"].append((uplink_bytes(lab) - before) / size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--uplink-mbit", type=float, default=20.0)
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--json", default="bench-results/artifacts_lab.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    with tempfile.TemporaryDirectory(prefix="ma-", dir="/tmp") as root:
        for i in range(args.runs):
            one_run(Path(root), i, args, samples)
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    report("artifacts_lab", args.json, args.runs, samples, TARGETS, size_mb=args.size_mb,
           uplink_mbit=args.uplink_mbit, hosts=args.hosts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
