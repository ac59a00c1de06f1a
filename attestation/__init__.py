"""Remote attestation for meshd: evidence, reference values, verification and certificates.

Pure: no I/O. The verifier takes `now` as an argument. Modules:
- signed: the signed-document envelope (Ed25519, kind-separated) shared by the others;
- evidence: a node's claims about itself (EAT names), signed by the node key;
- policy: reference values (allowed package digests per version, minimum version, sites
  that require TPM evidence), signed by the mesh root;
- tpm: TPM 2.0 structures, quote appraisal against the event log, credential activation;
- verifier: `verify(evidence, challenge, node key, policy, site, now)` -> Verdict with reasons;
- certs: the mesh root CA and short-lived X.509 membership certificates;
- revocation: the signed revocation list with its monotonic number.
"""
