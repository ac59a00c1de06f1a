"""This node's membership at start: resumed from the data dir, founded (a new mesh and its
site, or a new site of an existing mesh with a founder token), or joined (meshd.node.joining
decides whom to ask next, what each answer means and when to give up).

Invariants:
- Nothing is saved before the welcome was checked: a founder's welcome must carry the mesh
  root its trust documents open with (`founder_welcome_problem`).
- Only a denial (a verdict) ends a join before its timeout; every failed attempt is logged
  once per distinct outcome, and `meshctl status` shows what the joiner waits for.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.policy import Policy, open_policy, sign_policy
from attestation.revocation import RevocationList, open_revocations, sign_revocations
from attestation.signed import AttestationError
from meshd import __version__, tokens
from meshd.commands import Bootstrap, Refused, node_from_wire
from meshd.exitcodes import EXIT_CONFIG, EXIT_REFUSED, EXIT_UNAVAILABLE
from meshd.io import peer
from meshd.io.attester import package_digest
from meshd.io.context import FatalStartupError, NodeContext, new_cert_serial
from meshd.io.identity import Membership, save_certificates
from meshd.io.tls import joiner_context
from meshd.io.tpm import TpmUnavailable
from meshd.node import admitting
from meshd.node.joining import FOUND, JOIN, RESUME, GiveUp, Joining, Unreachable

log = logging.getLogger("meshd.daemon")

# While joining: look for candidates this often (cheap: a dict read).
JOIN_POLL = 0.05
# While joining and nobody is found: ask by mDNS this often, for this long (after that the
# browser's own backing-off schedule is enough; a site that is not there is not a hurry).
JOIN_QUERY_PERIOD = 0.25
JOIN_FAST_QUERY_WINDOW = 5.0


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def founder_welcome_problem(welcome: dict, site: str) -> str | None:
    """Why a welcome that makes this node the founder of `site` cannot be used, or None.
    Checked before anything is saved: the root key must be the mesh root the trust documents
    open with, and they must belong to the welcome's mesh (the bootstrap checks them again)."""
    if welcome.get("site") != site:
        return f"it is for site {welcome.get('site')!r}, the token for {site!r}"
    fields = ("mesh_id", "root_key", "trust_root", "member_cert", "root_cert")
    if not all(isinstance(welcome.get(f), str) and welcome[f] for f in fields):
        return f"it lacks one of {', '.join(fields)}"
    try:
        root_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(welcome["root_key"]))
        if raw_public_key(root_key).hex() != welcome["trust_root"]:
            return "its root key is not the mesh root its trust documents name"
        root = bytes.fromhex(welcome["trust_root"])
        policy, revocations = open_policy(welcome.get("policy"), root), open_revocations(welcome.get("revocations"), root)
    except (ValueError, AttestationError) as e:
        return f"its trust documents do not verify ({e})"
    if policy.mesh_id != welcome["mesh_id"] or revocations.mesh_id != welcome["mesh_id"]:
        return "its trust documents belong to another mesh"
    return None


class JoinRefused(peer.PeerError):
    """A member answered a join with a refusal (meshd.node.admitting says what its code means)."""

    def __init__(self, refusal: admitting.JoinRefusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal



def _gave_up(give_up: GiveUp) -> FatalStartupError:
    return FatalStartupError(give_up.reason, EXIT_REFUSED if give_up.refused else EXIT_UNAVAILABLE)


class MembershipService:
    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    async def establish(self, way: str) -> None:
        """Resume, join or found, as meshd.node.joining.start_path decided: once this returns,
        the node is a member running Raft."""
        ctx = self.ctx
        if way == RESUME:
            assert ctx.membership is not None
            ctx.start_raft()
            ctx.event("membership", f"resumed membership of site {ctx.membership.site}")
        elif way == JOIN:
            assert ctx.config.join
            await self._join_site()
        else:
            assert way == FOUND
            await self._found_site()

    async def _found_site(self) -> None:
        """No data, no token: this node founds a new mesh (and its trust root) and its site."""
        assert self.ctx.identity is not None
        mesh_id = uuid.uuid4().hex
        root_key = Ed25519PrivateKey.generate()
        now = time.time()
        # Only a founder makes certificates here: X.509 is loaded on demand (about 1.6 MB
        # resident that the other members do not carry).
        from attestation.certs import cert_to_pem, issue_member_cert, make_root
        root_cert = make_root(root_key, mesh_id, now)
        # The founder's own software is the first reference value; `meshctl policy` adds more.
        policy = Policy(mesh_id=mesh_id, serial=1, min_version=__version__,
                        allowed_digests={__version__: frozenset({package_digest()})}, issued_at=now)
        trust = {"root": raw_public_key(root_key).hex(), "root_cert": cert_to_pem(root_cert),
                 "policy": sign_policy(root_key, policy),
                 "revocations": sign_revocations(root_key, RevocationList(mesh_id, 0))}
        own_cert = issue_member_cert(root_key, root_cert, self.ctx.identity.public_key, mesh_id, self.ctx.config.site,
                                     self.ctx.identity.node_id, now, serial=new_cert_serial())
        await self._start_site(self.ctx.config.site, mesh_id, raw_private_key(root_key).hex(), trust,
                               cert_to_pem(own_cert))
        self.ctx.event("membership", f"founded site {self.ctx.config.site}", site=self.ctx.config.site)

    async def _start_site(self, site: str, mesh_id: str, root_key: str, trust: dict, member_cert: str) -> None:
        """Become the first voter of a new site of mesh `mesh_id`: save what a restart resumes
        from (membership, certificates), then start Raft and commit the site's bootstrap with
        the mesh trust documents (`trust`: root, root_cert, policy, revocations)."""
        self.ctx.membership = Membership(site=site, mesh_id=mesh_id, site_secret=secrets.token_hex(32), voter=True,
                                     peer_port=self.ctx.peer_port, raft_port=self.ctx.raft_port, partners=[],
                                     root_key=root_key)
        # Certificates first: membership.json is what makes this data dir a member's.
        save_certificates(self.ctx.data_dir, member_cert, trust["root_cert"])
        self.ctx.membership.save(self.ctx.data_dir)
        self.ctx.start_raft()
        command = Bootstrap(site=site, mesh_id=mesh_id, node=node_from_wire(self.ctx.node_plain()), trust=trust,
                            actor=self.ctx.config.name)
        result = await self.ctx.commit(command, retry_until=time.monotonic() + 30)
        if isinstance(result, Refused):
            raise FatalStartupError(f"could not found site: {result.text}")

    async def _join_site(self) -> None:
        """Ask members of the token's site to admit this node until one does (meshd.node.joining
        decides whom to ask next, what each answer means and when to give up)."""
        try:
            token = tokens.parse_token(self.ctx.config.join or "")
        except tokens.TokenError as e:
            raise FatalStartupError(f"--join: {e}", EXIT_CONFIG) from None
        started = time.monotonic()
        joining = self.ctx.joining = Joining(site=token.site, started=started)
        last_query = 0.0
        while True:
            now = time.monotonic()
            found: list[str] = []
            if self.ctx.discovery:
                found = [c.address for c in self.ctx.discovery.candidates(token.site)]
                if not found and now - started < JOIN_FAST_QUERY_WINDOW and now - last_query >= JOIN_QUERY_PERIOD:
                    last_query = now
                    probed = await trio.to_thread.run_sync(self.ctx.discovery.probe)
                    found = [c.address for c in probed if c.site == token.site]
            for address in joining.candidates(found, list(self.ctx.config.peers), time.monotonic()):
                try:
                    welcome = await self._join_via(address, token)
                except JoinRefused as e:
                    outcome: Unreachable | admitting.JoinRefusal = e.refusal
                except (peer.PeerError, OSError, trio.TooSlowError, KeyError, ValueError) as e:
                    outcome = Unreachable(str(e) or type(e).__name__)
                else:
                    self.ctx.joining = None
                    await self._welcomed(address, token, welcome)
                    return
                new, give_up = joining.failed(address, outcome, time.monotonic())
                if new:
                    log.info("join attempt failed", extra={"peer": address, "outcome": joining.attempts[address].outcome,
                                                           "reason": joining.attempts[address].reason})
                if give_up is not None:
                    raise _gave_up(give_up)
            give_up = joining.expired(time.monotonic())
            if give_up is not None:
                raise _gave_up(give_up)
            await trio.sleep(JOIN_POLL)

    async def _welcomed(self, address: str, token: tokens.ParsedToken, welcome: dict) -> None:
        """A member admitted this node: become a member of its site, or found a new one."""
        if welcome.get("founder") is True:
            # No members of the site yet: this node is its first voter, in the mesh
            # (trust root, policy, revocations) of the member that let it in.
            await self._start_site(token.site, welcome["mesh_id"], welcome["root_key"],
                                   {"root": welcome["trust_root"], "root_cert": welcome["root_cert"],
                                    "policy": welcome["policy"], "revocations": welcome["revocations"]},
                                   welcome["member_cert"])
            self.ctx.event("membership", f"founded site {token.site} in mesh {welcome['mesh_id']} via {address}",
                       site=token.site, mesh_id=welcome["mesh_id"])
            return
        self.ctx.membership = Membership(site=token.site, mesh_id=welcome["mesh_id"],
                                     site_secret=welcome["site_secret"], voter=bool(welcome["voter"]),
                                     peer_port=self.ctx.peer_port, raft_port=self.ctx.raft_port,
                                     partners=list(welcome["partners"]),
                                     root_key=str(welcome.get("root_key", "")))
        save_certificates(self.ctx.data_dir, str(welcome["member_cert"]), str(welcome["root_cert"]))
        self.ctx.membership.save(self.ctx.data_dir)
        self.ctx.event("membership", f"joined site {token.site} via {address}", site=token.site,
                   voter=self.ctx.membership.voter)
        self.ctx.start_raft()

    async def _join_via(self, address: str, token: tokens.ParsedToken) -> dict:
        assert self.ctx.identity is not None
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        conn = await peer.open_peer(address, joiner_context())
        try:
            hello = {"type": "join_hello", "site": token.site}
            if self.ctx.tpm is not None:
                hello["tpm"] = self.ctx.tpm.keys()
            await conn.send(hello)
            challenge = await conn.receive()
            if challenge.get("type") == "refused":
                raise JoinRefused(admitting.JoinRefusal.from_wire(challenge))
            if challenge.get("type") != "challenge":
                raise peer.PeerError(challenge.get("error") or "member did not send a challenge")
            nonce, member_eph = bytes.fromhex(challenge["nonce"]), bytes.fromhex(challenge["member_eph"])
            credential = b""
            if self.ctx.tpm is not None:
                credential = await self._activate(challenge.get("tpm_credential"))
            node = self.ctx.node_plain() | {"site": token.site}
            transcript = tokens.join_transcript(nonce, eph_pub, member_eph, token.token_id, node)
            await conn.send({"type": "join_request", "token_id": token.token_id, "node": node,
                             "joiner_eph": eph_pub.hex(), "proof": tokens.token_proof(token.secret, transcript),
                             "signature": tokens.sign(self.ctx.identity.private_key, transcript),
                             "evidence": await self.ctx.evidence(nonce, credential)})
            answer = await conn.receive(timeout=15)
            if answer.get("type") == "refused":
                raise JoinRefused(admitting.JoinRefusal.from_wire(answer))
            if answer.get("type") != "welcome":
                raise peer.PeerError(answer.get("reason") or answer.get("error") or "join refused")
            key = tokens.session_key(eph, member_eph, token.secret, transcript)
            try:
                welcome = tokens.unseal(key, answer["sealed"])
            except tokens.TokenError as e:
                raise peer.PeerError(str(e)) from None
            if welcome.get("founder") is True:
                problem = founder_welcome_problem(welcome, token.site)
                if problem:
                    raise peer.PeerError(f"{address} sent an unusable welcome for a new site: {problem}")
            return welcome
        finally:
            await conn.aclose()

    async def _activate(self, offered: object) -> bytes:
        """Our TPM's answer to the verifier's credential challenge."""
        assert self.ctx.tpm is not None
        if not isinstance(offered, dict):
            raise peer.PeerError("the member sent no TPM credential challenge (it cannot appraise TPM evidence)")
        try:
            id_object, secret = bytes.fromhex(offered["id_object"]), bytes.fromhex(offered["encrypted_secret"])
        except (KeyError, TypeError, ValueError):
            raise peer.PeerError("malformed TPM credential challenge") from None
        try:
            return await trio.to_thread.run_sync(self.ctx.tpm.activate_credential, id_object, secret)
        except (TpmUnavailable, ValueError) as e:
            raise peer.PeerError(str(e)) from None
