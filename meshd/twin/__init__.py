"""The digital twin: the real cores on a simulated fleet (`meshd sim`, docs/sim.md)."""
