"""Everything that touches sockets, processes, clocks and threads; the pure cores stay outside."""
