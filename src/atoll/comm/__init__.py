"""Communication across islands: the global all-reduce and what it put on the wire."""
