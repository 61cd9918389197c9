"""Getting tasks to workers and back: the Celery app, worker heartbeats, and finding tasks the
broker lost so their senders send them again."""
