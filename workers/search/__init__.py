"""The search worker: every page of every page collection in memory, scored by an int8 scan,
the best reranked exactly."""
