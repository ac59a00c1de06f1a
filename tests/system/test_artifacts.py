"""Artifacts on real daemons: a spec's file pushed by `meshctl deploy` runs on three nodes,
each of which fetched and verified it over the peer port; a member serving wrong bytes is
detected and the fetch completes from another; an archive that would unpack outside its
directory never runs; what a kept version pins cannot be removed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from meshd.io.localsite import wait_for

pytestmark = pytest.mark.system

MB = 1 << 20


def meshctl(node, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    shown = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--socket", node.socket, *args],
                           capture_output=True, text=True, timeout=120)
    if check:
        assert shown.returncode == 0, shown.stderr
    return shown


def checker(name: str, replicas: int, artifact: str, extra: str = "", **labels: str) -> str:
    """An app that prints the sha256 of its artifact, then sleeps."""
    constraint = ""
    if labels:
        constraint = "[app.constraints]\nlabels = { " + ", ".join(f'{k} = "{v}"' for k, v in labels.items()) + " }\n"
    return f'''[app]
name = "{name}"
replicas = {replicas}
command = ["{sys.executable}", "-c", "import hashlib, os, sys, time; p = sys.argv[1]; print('sha', hashlib.sha256(open(p, 'rb').read()).hexdigest(), os.environ['MESHD_ARTIFACT_MODEL'] == p, flush=True); time.sleep(600)", "${{artifact:model}}"]
user = "root"
{constraint}
[[app.artifact]]
name = "model"
{artifact}
{extra}'''


def printed_sha(node, alloc_id: str) -> str | None:
    text = node.call("logs", alloc=alloc_id, lines=50)["data"]
    for line in text.splitlines():
        if " sha " in f" {line}":
            parts = line.split()
            return parts[parts.index("sha") + 1] + ":" + parts[-1]
    return None


def test_a_spec_with_a_file_runs_on_three_nodes_each_verifying_what_it_fetched(three, tmp_path):
    data = os.urandom(5 * MB + 123)
    (tmp_path / "model.bin").write_bytes(data)
    (tmp_path / "app.toml").write_text(checker("det", 3, 'file = "model.bin"'))
    first = three.nodes[0]
    meshctl(first, "deploy", str(tmp_path / "app.toml"))
    wait_for(lambda: len(three.running("det", via=first)) == 3, 60, interval=0.2, what="three replicas running")
    allocs = three.running("det", via=first)
    assert len({a["node"] for a in allocs}) == 3  # one a node: each fetched it
    want = hashlib.sha256(data).hexdigest() + ":True"
    by_name = {n.name: n for n in three.nodes}
    for alloc in allocs:
        node = by_name[alloc["node"]]
        assert wait_for(lambda: printed_sha(node, alloc["alloc_id"]), 20, what="the sha printed") == want
    listing = json.loads(meshctl(first, "--json", "artifact", "ls").stdout)
    [row] = listing
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert row["digest"] == digest and row["size"] == len(data) and row["name"] == "model.bin"
    wait_for(lambda: len(json.loads(meshctl(first, "--json", "artifact", "ls").stdout)[0]["holders"]) == 3, 20,
             what="every node told the site it holds it")
    assert row["pinned_by"] == ["det@v1"]
    # a pinned artifact cannot be removed
    refused = meshctl(first, "artifact", "rm", digest, check=False)
    assert refused.returncode != 0 and "pinned by det@v1" in refused.stderr and refused.stderr.startswith("error:")
    # read-only to the workload, and the store's copy is the exact bytes
    blob = by_name[allocs[0]["node"]].data_dir / "artifacts" / "blobs" / digest.removeprefix("sha256:")
    assert blob.read_bytes() == data and oct(blob.stat().st_mode & 0o777) == "0o444"


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, body in entries:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def test_a_lying_member_is_found_out_and_an_archive_that_escapes_never_runs(make_site, tmp_path):
    # Pieces leave each member at 16 Mbit/s: the fetch takes seconds, so both holders are asked.
    site = make_site(extra_args=("--artifact-upload-mbps", "16"))
    site.found()
    for role in ("liar", "target"):
        site.join(extra_args=("--label", f"role={role}"))
    origin, liar, target = site.nodes
    data = os.urandom(4 * MB + 7)
    (tmp_path / "model.bin").write_bytes(data)
    pushed = json.loads(meshctl(origin, "--json", "artifact", "push", str(tmp_path / "model.bin")).stdout)
    digest = pushed["digest"]
    assert pushed["size"] == len(data) and digest == "sha256:" + hashlib.sha256(data).hexdigest()
    # The liar holds a damaged copy: the origin's manifest and piece list, other bytes.
    source, planted = origin.data_dir / "artifacts" / "blobs", liar.data_dir / "artifacts" / "blobs"
    hex_digest = digest.removeprefix("sha256:")
    for suffix in (".manifest", ".pieces"):
        (planted / f"{hex_digest}{suffix}").write_bytes((source / f"{hex_digest}{suffix}").read_bytes())
    damaged = bytearray(data)
    for offset in range(0, len(damaged), MB):
        damaged[offset] ^= 0xFF  # every piece
    (planted / hex_digest).write_bytes(bytes(damaged))
    wait_for(lambda: sorted(json.loads(meshctl(origin, "--json", "artifact", "ls").stdout)[0]["holders"])
             == sorted([origin.name, liar.name]), 20, what="the liar telling the site it holds it")
    (tmp_path / "app.toml").write_text(checker("det", 1, f'digest = "{digest}"', role="target"))
    meshctl(origin, "deploy", str(tmp_path / "app.toml"))
    # pending meanwhile, saying how far the fetch got
    [pending] = wait_for(lambda: [a for a in site.allocs("det", via=origin) if a["state"] == "pending"
                                  and "fetching model" in (a.get("reason") or "")], 30, interval=0.05,
                         what="the replica pending while its artifact is fetched")
    assert pending["reason"].startswith("fetching model ") and pending["reason"].endswith(" %"), pending
    wait_for(lambda: three_running(site, origin), 60, interval=0.2, what="the replica running on the target")
    [alloc] = site.running("det", via=origin)
    assert alloc["node"] == target.name
    assert wait_for(lambda: printed_sha(target, alloc["alloc_id"]), 20) == hashlib.sha256(data).hexdigest() + ":True"
    events = [e["message"] for e in target.call("events")]
    assert any(f"{liar.name} sent a bad piece of model.bin" in m for m in events), events[-20:]

    # An archive with a member outside its directory: refused at unpack, the workload never runs.
    (tmp_path / "evil.tgz").write_bytes(_tar([("ok.txt", b"fine"), ("../../escaped", b"pwned")]))
    (tmp_path / "evil.toml").write_text(checker("evil", 1, 'file = "evil.tgz"\nunpack = true', role="target"))
    meshctl(origin, "deploy", str(tmp_path / "evil.toml"))
    [bad] = wait_for(lambda: [a for a in site.allocs("evil", via=origin) if "cannot unpack" in (a.get("reason") or "")],
                     60, interval=0.2, what="the archive refused")
    assert "'..'" in bad["reason"] or ".." in bad["reason"]
    assert not (target.data_dir / "artifacts" / "escaped").exists()
    assert not list((target.data_dir / "artifacts").rglob("escaped"))


def three_running(site, via) -> bool:
    return len(site.running("det", via=via)) == 1


def test_an_offline_release_key_signs_once_the_policy_names_it(make_site, tmp_path):
    site = make_site()
    node = site.found()
    (tmp_path / "tool.bin").write_bytes(b"#!/bin/sh\necho release\n" * 1000)
    made = json.loads(meshctl(node, "--json", "artifact", "keygen", str(tmp_path / "release.key")).stdout)
    assert oct((tmp_path / "release.key").stat().st_mode & 0o777) == "0o600"
    mesh = node.call("policy")["mesh_id"]
    signed = json.loads(meshctl(node, "--json", "artifact", "sign", str(tmp_path / "tool.bin"), "--key",
                                str(tmp_path / "release.key"), "--mesh", mesh).stdout)
    assert signed["signer"] == made["public_key"]
    push = ("artifact", "push", str(tmp_path / "tool.bin"), "--manifest", signed["manifest"])
    refused = meshctl(node, *push, check=False)
    assert refused.returncode != 0 and "does not trust" in refused.stderr
    meshctl(node, "policy", "release-key", made["public_key"])
    pushed = json.loads(meshctl(node, "--json", *push).stdout)
    assert pushed["digest"] == signed["digest"]
    # a manifest for other bytes is refused, whoever signed it
    (tmp_path / "other.bin").write_bytes(b"other")
    wrong = meshctl(node, "artifact", "push", str(tmp_path / "other.bin"), "--manifest", signed["manifest"],
                    check=False)
    assert wrong.returncode != 0 and "describes" in wrong.stderr
    blobs = node.data_dir / "artifacts" / "blobs"
    assert not (blobs / hashlib.sha256(b"other").hexdigest()).exists()  # nothing kept of refused bytes


def _served(node) -> float:
    for line in node.call("metrics").splitlines():
        if line.startswith('meshd_artifact_bytes_total{direction="served"}'):
            return float(line.split()[-1])
    return 0.0


def test_another_site_pulls_it_once_then_shares_it_inside(make_site, tmp_path):
    alpha = make_site("a", site="alpha", extra_args=("--no-mdns",))
    origin = alpha.found()
    address = origin.call("status")["address"]
    founder = origin.call("token_create", site="beta", ttl=None, new_site=True)
    beta = make_site("b", site="beta", extra_args=("--no-mdns", "--peer", address))
    b1 = beta.add_node()
    b1.start(join=founder["token"])
    wait_for(lambda: (b1.try_call("status") or {}).get("role") == "leader", 30, what="b1 leading beta")
    beta.wait_ready(b1)
    for _ in range(2):
        node = beta.add_node(("--peer", b1.call("status")["address"]))
        node.start(join=beta.token(via=b1))
        beta.wait_ready(node)
    data = os.urandom(6 * MB + 3)
    (tmp_path / "model.bin").write_bytes(data)
    spec = checker("det", 3, 'file = "model.bin"').replace('replicas = 3', 'replicas = 3\nsites = ["beta"]')
    (tmp_path / "app.toml").write_text(spec)
    meshctl(origin, "deploy", str(tmp_path / "app.toml"))
    wait_for(lambda: len(beta.running("det", via=b1)) == 3, 90, interval=0.3, what="three replicas running in beta")
    by_name = {n.name: n for n in beta.nodes}
    for alloc in beta.running("det", via=b1):
        assert wait_for(lambda: printed_sha(by_name[alloc["node"]], alloc["alloc_id"]), 20) == \
            hashlib.sha256(data).hexdigest() + ":True"
    # beta pulled it over its "uplink" once: the origin served one copy (and a piece list)
    assert len(data) <= _served(origin) <= 1.1 * len(data)
    [row] = json.loads(meshctl(b1, "--json", "artifact", "ls").stdout)
    assert sorted(row["holders"]) == sorted(by_name)


def test_collection_makes_room_from_unpinned_artifacts_and_never_drops_a_kept_version(make_site, tmp_path):
    site = make_site(extra_args=("--artifact-quota-mb", "11"))
    node = site.found()
    blobs = node.data_dir / "artifacts" / "blobs"
    files = {}
    for name in ("spare", "v1", "v2", "late"):
        files[name] = tmp_path / f"{name}.bin"
        files[name].write_bytes(os.urandom(4 * MB))
    spare = json.loads(meshctl(node, "--json", "artifact", "push", str(files["spare"])).stdout)["digest"]
    for version in ("v1", "v2"):
        (tmp_path / "app.toml").write_text(checker("det", 1, f'file = "{version}.bin"'))
        meshctl(node, "deploy", str(tmp_path / "app.toml"))
        wait_for(lambda: any(a["state"] == "running" and a["version"] == int(version[1])
                             for a in site.allocs("det", via=node)), 60, interval=0.2, what=f"{version} running")
    kept = {hashlib.sha256(files[v].read_bytes()).hexdigest() for v in ("v1", "v2")}
    assert {p.name for p in blobs.iterdir() if "." not in p.name} == kept  # the spare made room for v2
    assert not (blobs / spare.removeprefix("sha256:")).exists()
    refused = meshctl(node, "artifact", "push", str(files["late"]), check=False)
    assert refused.returncode != 0 and "pinned by kept app versions" in refused.stderr, refused.stderr
    assert {p.name for p in blobs.iterdir() if "." not in p.name} == kept
