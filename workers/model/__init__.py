"""The model worker: its runtime (model, batcher, heartbeat), the greedy batcher, and its tasks."""
