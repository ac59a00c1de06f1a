"""The node core: every decision a meshd daemon makes, as pure code (no I/O, no clock).

Each concern takes what the node knows (the replicated state, Raft's view, `now`) and returns
what to do as effects (meshd.node.effects); the trio services in meshd.io carry the effects
out and feed the outcomes back. One module decides each thing:

- leading    the leader's duties: liveness verdicts, the Raft voter set, placement plans
- attesting  re-attestation: who is due, what fresh evidence earns or costs (quarantine, revocation)
- trust      what follows a revocation and a secret rotation
- worker     which workloads this node runs, and when it must leave (it was revoked)
- admitting  the member side of a join: whether this member can decide, what a refusal means
- refusals   which refused joins go into the site's audit, and how often
- joining    the joiner side: which member to ask next, when to give up, what it waits for
- access     who may open or keep a connection to this node
"""
