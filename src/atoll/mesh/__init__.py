"""The mesh of islands: the coordinator, membership epochs and the global process groups."""
