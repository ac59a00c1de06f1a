"""Artifacts: content-addressed files workloads need, signed, shared peer to peer inside a site."""
