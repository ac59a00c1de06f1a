"""The services of one meshd daemon, one per concern, each mirroring a core of meshd.node.

Each service is built with the node's context (meshd.io.context) and what it needs of the
others (passed in explicitly), declares the effects it carries out, and is started by the
runtime (meshd.io.runtime) with `nursery.start`: it waits (a wakeup, a timer, a peer),
calls its core, carries out the effects and feeds the outcomes back.

- membership  founding a site, joining one (meshd.node.joining), at start
- peers       the peer port: joins of others (meshd.node.admitting), member calls, who may
              keep a connection (meshd.node.access)
- leader      the leader's duties (meshd.node.leading) and Raft voter changes
- attestation re-attestation of members (meshd.node.attesting), certificate renewal
- trust       revocation (meshd.node.trust), the revoked node's notice, secret rotation
- worker      this node's workloads (meshd.node.worker), its reports, leaving when revoked
"""
