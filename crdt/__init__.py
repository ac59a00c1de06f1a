"""Cross-site state for meshd: the mesh document schema over pycrdt and its sync messages.

Pure: no I/O. Sites exchange these documents so that a site cut off from the others keeps
accepting local changes and merges when the link returns.
"""
