"""meshd: peer-to-peer orchestration for edge sites.

Pure cores (spec, state, sitestate, placement, reconcile, liveness, wire, tokens, admission)
never do I/O; everything that touches sockets, processes, clocks or threads lives in meshd.io.
"""

__version__ = "0.1.0"
