"""Ingestion jobs in Redis: their state and counters, the ledger of their tasks in flight, the
ids of the units (pages, chunks) they count, and the event stream SSE clients read."""
