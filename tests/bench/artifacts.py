"""Shipping an artifact inside a site: real daemons on loopback, and the piece check alone.

    python3 -m tests.bench.artifacts [--runs 3] [--size-mb 100] [--nodes 5] [--upload-mbps 400]
                                     [--json bench-results/artifacts.json]

Each run builds a fresh site of `--nodes` daemons, every one serving pieces at most at
`--upload-mbps` (the link a device gives its peers), pushes a `--size-mb` file on the first
(`meshctl artifact push`), deploys an app with one replica on every node that needs it, and
measures:
- push_s: the push (hash, store, sign, commit);
- all_hold_s: from the deploy until every node holds it verified (`artifact ls` holders);
- origin_served_x: bytes the first node served, as a multiple of the artifact (1.0 would be
  one copy leaving it; nodes that finished early serve the rest);
- baseline_one_source_s: what all nodes fetching from the first alone at that rate would take
  at best: (nodes - 1) x size / rate, computed in the same run;
- verify_pieces_per_s: 1 MiB pieces checked by PieceFetch on one core (sha256 and length).
The cross-site figure (a site behind a thin uplink pulling once) needs the lab and comes
with cross-site pulls. Prints a table of medians and writes every sample to JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from meshd.io.localsite import LocalSite, wait_for
from tests.bench.report import report

TARGETS = {
    "push_s": (None, "s"),
    "all_hold_s": (None, "s"),
    "baseline_one_source_s": (None, "s"),
    "origin_served_x": (None, "x size"),
    "verify_pieces_per_s": (None, "pieces/s"),
}


def verify_rate(pieces: int = 200) -> float:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from meshd.artifacts import pieces as P
    from meshd.artifacts.manifest import open_manifest, pieces_digest, public_hex, sign_manifest
    size = pieces << 20
    data = os.urandom(size)
    piece_list = P.piece_list_of(data, 1 << 20)
    key = Ed25519PrivateKey.generate()
    doc = sign_manifest(key, mesh="m", digest="sha256:" + hashlib.sha256(data).hexdigest(), size=size, name="b",
                        pieces=pieces_digest(piece_list), pushed_by="bench", pushed_at=1.0)
    manifest = open_manifest(doc, mesh="m", trusted={public_hex(key): "root"})
    fetch = P.PieceFetch(manifest, P.piece_digests(piece_list, manifest))
    fetch.add_peer("p")
    chunks = [data[i << 20:(i + 1) << 20] for i in range(pieces)]
    started = time.process_time()
    for i, chunk in enumerate(chunks):
        fetch.received("p", i, chunk)
    took = time.process_time() - started
    assert fetch.done
    return pieces / took


def meshctl(node, *args: str) -> str:
    shown = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", node.socket, *args],
                           capture_output=True, text=True, timeout=600)
    if shown.returncode != 0:
        raise RuntimeError(shown.stderr)
    return shown.stdout


def served_bytes(node) -> float:
    for line in node.call("metrics").splitlines():
        if line.startswith('meshd_artifact_bytes_total{direction="served"}'):
            return float(line.split()[-1])
    return 0.0


def one_run(root: Path, index: int, args, samples: dict) -> None:
    site = LocalSite(root / f"run{index}", site="bench", prefix=f"a{index}",
                     extra_args=("--artifact-upload-mbps", str(args.upload_mbps)))
    try:
        site.start(args.nodes)
        origin = site.nodes[0]
        blob = root / f"blob{index}"
        blob.write_bytes(os.urandom(args.size_mb << 20))
        started = time.monotonic()
        digest = json.loads(meshctl(origin, "--json", "artifact", "push", str(blob)))["digest"]
        samples["push_s"].append(time.monotonic() - started)
        spec = root / f"app{index}.toml"
        spec.write_text(f'[app]\nname = "use"\nreplicas = {args.nodes}\nuser = "root"\n'
                        f'command = ["sleep", "3600"]\n[[app.artifact]]\nname = "blob"\ndigest = "{digest}"\n')
        started = time.monotonic()
        meshctl(origin, "deploy", str(spec))
        wait_for(lambda: len(json.loads(meshctl(origin, "--json", "artifact", "ls"))[0]["holders"]) == args.nodes,
                 600, interval=0.2, what="every node holding the artifact")
        samples["all_hold_s"].append(time.monotonic() - started)
        samples["origin_served_x"].append(served_bytes(origin) / (args.size_mb << 20))
        rate = args.upload_mbps * 1e6 / 8
        samples["baseline_one_source_s"].append((args.nodes - 1) * (args.size_mb << 20) / rate)
    except Exception:
        print(site.dump_logs()[-20000:], file=sys.stderr)
        raise
    finally:
        site.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--upload-mbps", type=float, default=400.0)
    parser.add_argument("--json", default="bench-results/artifacts.json")
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {k: [] for k in TARGETS}
    for _ in range(5):
        samples["verify_pieces_per_s"].append(verify_rate())
    with tempfile.TemporaryDirectory(prefix="mb-", dir="/tmp") as root:
        for i in range(args.runs):
            one_run(Path(root), i, args, samples)
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    report("artifacts", args.json, args.runs, samples, TARGETS, size_mb=args.size_mb, nodes=args.nodes,
           upload_mbps=args.upload_mbps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
