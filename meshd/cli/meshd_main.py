"""The `meshd` command: `meshd run` (the daemon), `meshd demo` (a local three-node site) and
`meshd digest [BUILD]` (the attestation reference digest of a build, before installing it) and
`meshd sim SCENARIO.toml` (a scenario on the digital twin, meshd.io.sim).

Exit status: 0 on a clean stop; otherwise a one-line `error: ...` on stderr and a status that
says what kind of failure it was (meshd.exitcodes: 78 a bad option or config, 73 a port in
use, 77 not permitted, 75 another daemon on the data dir, 80 revoked, 81 join refused, 69 no
member admitted it in time, 1 anything else), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from meshd import __version__
from meshd.exitcodes import EXIT_CONFIG, EXIT_ERROR, EXIT_OK

TUNING_OPTIONS = (
    ("--heartbeat-interval", float, "seconds between the Raft leader's heartbeats to each member"),
    ("--lease", float, "seconds without a heartbeat answer before a node is marked down"),
    ("--raft-min-timeout", float, "Raft election timeout, lower bound (s)"),
    ("--raft-max-timeout", float, "Raft election timeout, upper bound (s)"),
    ("--log-max-bytes", int, "rotate a workload's log at this size"),
    ("--log-keep", int, "rotated log files kept per workload"),
    ("--workload-user", str, "who workloads run as when their spec names nobody (default meshd-workload; "
                             "a daemon that is not root runs them as itself)"),
    ("--reserve-cpu", float, "cores kept out of placement for meshd itself (default 0.1)"),
    ("--reserve-memory-mb", int, "MiB kept out of placement for meshd itself (default 128)"),
    ("--artifact-quota-mb", int, "MiB the artifact store may take in the data dir (default 10240)"),
    ("--artifact-upload-mbps", float, "Mbit/s this node serves artifact pieces to its peers at most (default 0: "
                                      "no limit)"),
    ("--reattest-interval", float, "seconds between re-attestations of every member"),
    ("--sync-interval", float, "seconds between state-vector exchanges of a cross-site sync session"),
    ("--stopped-app-retention", float, "seconds a stopped app stays in the site's state before it is forgotten"),
    ("--document-retention", str, "how long the mesh document keeps audit records and superseded or losing app "
                                  "edits (30d, 12h, 90m or seconds; default 30d)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshd", description="Peer-to-peer orchestration for edge sites.")
    parser.add_argument("--version", action="version", version=f"meshd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", help="TOML config file (keys are the option names)")
    run.add_argument("--data-dir", help="identity keys, Raft journal, workload logs")
    run.add_argument("--site", help="the site this node belongs to")
    run.add_argument("--name", help="human name of the node (default: hostname)")
    run.add_argument("--listen", help="IP:PORT for peer traffic (Raft uses PORT+1); port 0 picks free ones")
    run.add_argument("--advertise", help="IP announced to peers")
    run.add_argument("--admin-socket", help="path of the local admin socket")
    run.add_argument("--label", action="append", help="k=v node label (repeatable)")
    run.add_argument("--device", action="append", metavar="KIND=PATH",
                     help="a device workloads may ask for, e.g. coral=/dev/apex_0 (repeatable; NVIDIA GPUs and "
                          "/dev/dri render nodes are found on their own)")
    run.add_argument("--join", help="join token from `meshctl token create`")
    run.add_argument("--bootstrap", choices=["auto", "found", "join"],
                     help="with no membership yet: found a new mesh, join one (--join TOKEN needed), "
                          "or auto (join with a token, else found; the default)")
    run.add_argument("--peer", action="append", help="static peer IP:PORT (repeatable)")
    run.add_argument("--no-mdns", action="store_true", help="do not announce or browse mDNS")
    run.add_argument("--metrics", help="IP:PORT of the Prometheus exposition (http://IP:PORT/metrics), "
                                       "or off (default 127.0.0.1:9740)")
    run.add_argument("--tpm", help="attest with this TPM 2.0 (TCTI: device:/dev/tpmrm0, swtpm:host=H,port=P)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    for flag, kind, text in TUNING_OPTIONS:
        run.add_argument(flag, type=kind, help=text)

    demo = sub.add_parser("demo", help="start a local three-node site, deploy an example app, show it")
    demo.add_argument("--nodes", type=int, default=3, help="number of daemons (default 3)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary data dirs")

    digest = sub.add_parser("digest", help="the attestation reference digest of a build, before installing it")
    digest.add_argument("build", nargs="?", metavar="PACKAGE-OR-WHEEL-OR-DIR",
                        help="a .deb, a wheel, or a source tree / site-packages directory (default: this installation)")
    digest.add_argument("--json", action="store_true", help="print {version, digest, source} as JSON")
    sim = sub.add_parser("sim", help="run a scenario on the digital twin: the real cores on a simulated fleet")
    sim.add_argument("scenario", metavar="SCENARIO.toml", help="the scenario (docs/sim.md; examples in examples/sim/)")
    sim.add_argument("--seed", type=int, default=None, help="seed of the run's random draws (default: the scenario's)")
    sim.add_argument("--out", metavar="DIR", help="where timeline.jsonl, summary.json and run.svg go "
                                                  "(default: ./SCENARIO-sim)")
    sim.add_argument("--quiet", action="store_true", help="print the summary only, not the timeline")
    sim.add_argument("--json", action="store_true", help="print summary.json instead of the text")
    return parser


def cmd_sim(args: argparse.Namespace) -> int:
    from meshd.io.sim import run_sim

    return run_sim(args.scenario, args.seed, args.out, args.quiet, args.json)


def cmd_run(args: argparse.Namespace) -> int:
    from meshd.config import ConfigError, resolve_config

    toml_text = None
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                toml_text = f.read()
        except OSError as e:
            print(f"error: cannot read config {args.config}: {e.strerror}", file=sys.stderr)
            return EXIT_CONFIG
        except UnicodeDecodeError:
            print(f"error: cannot read config {args.config}: not UTF-8 text", file=sys.stderr)
            return EXIT_CONFIG
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = resolve_config(cli, toml_text, os.environ, socket.gethostname(), config_file=args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from meshd.io.memory import tune_malloc

    tune_malloc()  # before any thread starts
    import trio

    from meshd.io.runtime import FatalStartupError, Runtime, setup_logging

    setup_logging(config.log_level)
    try:
        trio.run(Runtime(config).run)
    except (FatalStartupError, BaseExceptionGroup) as e:
        # A refusal raised inside the daemon's nursery arrives wrapped in an exception group.
        fatal = _find_fatal(e, FatalStartupError)
        if fatal is None:
            raise
        print(f"error: {fatal}", file=sys.stderr)
        return getattr(fatal, "status", EXIT_ERROR)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _find_fatal(error: BaseException, kind: type) -> BaseException | None:
    if isinstance(error, kind):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _find_fatal(inner, kind)
            if found is not None:
                return found
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from meshd.io.demo import run_demo

    return run_demo(nodes=args.nodes, duration=args.duration, keep=args.keep)


def cmd_digest(args: argparse.Namespace) -> int:
    import json

    from meshd.io.builddigest import DigestError, digest_build

    try:
        build = digest_build(args.build)
    except DigestError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(build.to_plain()))
    else:
        print(f"meshd {build.version} digest {build.digest}")
        print(f"allow it before upgrading: meshctl policy allow --version {build.version} --digest {build.digest}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "digest":
        return cmd_digest(args)
    if args.command == "sim":
        return cmd_sim(args)
    return cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
