"""Typed Raft commands (meshd.commands): wire round trips, refusals with codes, and no caller
in meshd drops a commit's outcome."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd import commands as cmds
from meshd.commands import REFUSAL_CODES, Ok, Refused, result_from_wire
from meshd.placement.plan import Placement
from meshd.state import NodeRecord

NODE = NodeRecord(node_id="a" * 32, name="n1", site="lab", address="198.18.0.1:7700",
                  raft_address="198.18.0.1:7701", public_key="00" * 32, arch="x86_64", labels={"line": "1"},
                  version="0.1.0", boot_id="b", tpm_ak="")

EXAMPLES = [
    cmds.Bootstrap(site="lab", mesh_id="m", node=NODE, trust={"root": "x"}, actor="op"),
    cmds.SetPolicy(policy={"sig": "x"}, actor="op"),
    cmds.AdoptPolicy(policy={"sig": "x"}, site="b", actor="site b"),
    cmds.RevokeNode(node_id="a" * 32, revocations={"sig": "x"}, reason="stolen", number=3, actor="op"),
    cmds.AdoptRevocations(revocations={"sig": "x"}, sites=("b",), actor="site b"),
    cmds.Attested(node_id="a" * 32, boot_id="b"),
    cmds.Attested(node_id="a" * 32, boot_id="b", software="c" * 64, actor="attestation@n1"),
    cmds.RotateSecret(actor="n1"),
    cmds.Checkpoint(applied=120, chain="ab" * 16),
    cmds.AddArtifact(manifest={"kind": "artifact", "body": {}, "sig": "x"}, actor="op"),
    cmds.RemoveArtifact(digest="sha256:" + "ab" * 32, actor="op"),
    cmds.Heartbeat(node_id="n1", seq=0, artifacts=("sha256:" + "cd" * 32,)),
    cmds.CreateToken(token_id="t", site="lab", secret="ab", expires_at=10.0, actor="op"),
    cmds.AdmitNode(token_id="t", node=NODE, actor="n1"),
    cmds.FoundSite(token_id="t", node=NODE, actor="n1"),
    cmds.Heartbeat(node_id="a" * 32, seq=4, reports=(cmds.AllocReport("x1", "stopped", 1, None, 0, "done", True),),
                   boot_id="b", software="d" * 64),
    cmds.SetLiveness(node_id="a" * 32, liveness="down", reason="lease expired"),
    cmds.StopApp(app="svc", actor="op"),
    cmds.ApplyPlan(app="svc", version=2, placements=(Placement("x2", "svc", 2, 0, "a" * 32),),
                   stops=(("x1", "replaced by version 2"),)),
    cmds.PurgeApps(apps=("old", "older"), retention=86400.0),
    cmds.TrimAudit(upto_seq=120, retention=86400.0),
    cmds.Drain(node="n1", actor="op"),
    cmds.Undrain(node="n1", actor="op"),
    cmds.Quarantine(node_id="a" * 32, reason="meshd 0.2.0 with package digest " + "e" * 64 + " is not in the policy",
                    software="e" * 64, actor="attestation@n1"),
    cmds.RevokeToken(token_id="t", actor="op"),
    cmds.RemoveNode(node="n3", actor="op"),
    cmds.Rollout(app="web", version=3, action="promote", reason="looks good", actor="op"),
    cmds.PinVersion(app="web", version=2, pinned=False, actor="op"),
    cmds.RecordRefusal(action="join-refused", target="intruder (node 1234)", source="198.18.0.9:40000",
                       reason="token proof does not match", count=3, actor="n2"),
]


@pytest.mark.parametrize("command", EXAMPLES, ids=lambda c: c.op)
def test_every_command_survives_its_wire_form(command):
    wire = cmds.encode(command, cmds.Envelope(ts=5.0, request_id="r1"))
    assert wire["op"] == command.op and wire["ts"] == 5.0 and wire["request_id"] == "r1"
    decoded = cmds.decode(wire)
    assert not isinstance(decoded, Refused), decoded
    envelope, again = decoded
    assert again == command and envelope == cmds.Envelope(5.0, "r1")


@pytest.mark.parametrize("wire, words", [
    ({"op": "heartbeat", "ts": 1.0, "node_id": "a", "seq": 1, "software": "XYZ"}, "software must be a sha256"),
    ({"op": "quarantine", "ts": 1.0, "node_id": "a", "reason": "x" * 600}, "reason must be"),
    ({"op": "record_refusal", "ts": 1.0, "action": "reboot", "target": "x", "source": "", "reason": "r"},
     "action must be one of"),
    ({"op": "record_refusal", "ts": 1.0, "action": "join-refused", "target": "x", "source": "", "reason": "r",
      "count": 0}, "count must be"),
])
def test_new_fields_refuse_junk_with_their_name(wire, words):
    refused = cmds.decode(wire)
    assert isinstance(refused, Refused) and refused.code == cmds.MALFORMED and words in refused.text, refused


def test_every_op_has_an_example():
    assert {c.op for c in EXAMPLES} | {"submit_app"} == set(cmds.COMMANDS)


@pytest.mark.parametrize("wire, code, words", [
    ("junk", cmds.MALFORMED, "not a mapping"),
    ({"op": "fly", "ts": 1}, cmds.UNKNOWN_COMMAND, "unknown command"),
    ({"op": "drain", "ts": True}, cmds.MALFORMED, "ts must be"),
    ({"op": "drain", "ts": 1}, cmds.MALFORMED, "node must be"),
    ({"op": "heartbeat", "ts": 1, "node_id": "a", "seq": 1, "reports": "x"}, cmds.MALFORMED, "reports must be"),
    ({"op": "set_liveness", "ts": 1, "node_id": "a", "liveness": "zombie"}, cmds.MALFORMED, "ready or down"),
    ({"op": "submit_app", "ts": 1, "spec": {"app": {"name": "x"}}}, cmds.MALFORMED, "app."),
    ({"op": "submit_app", "ts": 1, "spec": {"app": {"name": "x", "command": ["y"]}}, "hold": True}, cmds.MALFORMED,
     "hold needs the mesh edit"),
    ({"op": "submit_app", "ts": 1, "spec": {"app": {"name": "x", "command": ["y"]}}, "hold": 1}, cmds.MALFORMED,
     "hold must be true or false"),
    ({"op": "rollout", "ts": 1, "app": "x", "version": 1, "action": "explode"}, cmds.MALFORMED, "abort"),
    ({"op": "apply_plan", "ts": 1, "plan": {"app": "a", "version": 1, "placements": [1]}}, cmds.MALFORMED,
     "placement must be"),
])
def test_malformed_commands_refuse_with_a_code_and_never_raise(wire, code, words):
    refused = cmds.decode(wire)
    assert isinstance(refused, Refused) and refused.code == code and words in refused.text


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children,
                                                                                         max_size=4), max_leaves=12),
       st.sampled_from(sorted(cmds.COMMANDS)))
def test_decoding_junk_never_raises(junk, op):
    wire = dict(junk) if isinstance(junk, dict) else {"junk": junk}
    wire.update(op=op, ts=1.0)
    outcome = cmds.decode(wire)
    assert isinstance(outcome, Refused) and outcome.code in REFUSAL_CODES or isinstance(outcome, tuple)


def test_results_have_a_wire_form_for_the_dedupe_table():
    assert result_from_wire(Ok({"epoch": 3}).to_wire()) == Ok({"epoch": 3})
    assert result_from_wire(Refused(cmds.STALE, "old").to_wire()) == Refused(cmds.STALE, "old")
    assert result_from_wire("junk").code == cmds.INTERNAL
    assert not hasattr(Refused(cmds.STALE, "old"), "fields")  # a refusal has no fields to read by mistake


def _calls_to_commit(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr):
            value = node.value.value if isinstance(node.value, ast.Await) else node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and \
                    value.func.attr in ("commit", "submit"):
                yield node.lineno


def test_no_caller_drops_the_outcome_of_a_commit():
    root = Path(__file__).resolve().parents[2] / "meshd"
    dropped = [f"{path.relative_to(root.parent)}:{line}" for path in sorted(root.rglob("*.py"))
               for line in _calls_to_commit(ast.parse(path.read_text()))]
    assert not dropped, f"commit results dropped (a refusal would go unseen): {dropped}"
