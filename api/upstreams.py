"""The upstream servers of the models that OpenAI-compatible servers compute, as their workers
publish them with each heartbeat (JSON under `upstreams` in each worker's stats hash; see
workers.backends.replicas): one entry per replica and worker for `/health/ready`, and Prometheus
families for `/metrics`. Such workers are found in keys.BACKEND_STATS_WORKERS, so they are seen
while they are out of the live sets (every upstream down)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from common import keys
from common.delivery.heartbeat import live_workers

SHOWN = ("url", "model", "state", "in_flight", "concurrency", "last_error", "server")  # in /health/ready
COUNTERS = {
    "requests": "Requests a worker sent to an upstream replica.",
    "errors": "Requests that failed on an upstream replica (connection error, timeout, 5xx).",
    "retries": "Requests tried again on another replica after failing on this one.",
    "cooldowns": "Times an upstream replica was taken out of rotation for failing.",
    "failed_checks": "Health checks (one-input embedding calls) an upstream replica failed.",
}
LABELS = ["worker", "model", "upstream"]


def replicas(stats: dict[str, str]) -> list[dict[str, Any]]:
    return json.loads(stats.get("upstreams") or "[]")


async def read(client: Any, ttl_s: float) -> dict[str, dict[str, str]]:
    """worker -> its stats hash, for the workers that publish upstreams (two round trips)."""
    workers = sorted(m.decode() for m in await live_workers(client, keys.BACKEND_STATS_WORKERS, ttl_s))
    if not workers:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.hgetall(keys.worker_stats(worker))
        hashes = await pipe.execute()
    return {w: {k.decode(): v.decode() for k, v in h.items()} for w, h in zip(workers, hashes) if h}


def ready_view(worker_stats: dict[str, dict[str, str]]) -> dict[str, list[dict[str, Any]]]:
    """model -> one entry per (worker, replica): its URL, state and load."""
    view: dict[str, list[dict[str, Any]]] = {}
    for worker, stats in sorted(worker_stats.items()):
        for replica in replicas(stats):
            shown = {name: replica[name] for name in SHOWN if name in replica}
            view.setdefault(stats.get("model", ""), []).append({"worker": worker, **shown})
    return view


def families(worker_stats: dict[str, dict[str, str]]) -> Iterator[Metric]:
    rows = [
        ([worker, stats.get("model", ""), replica["url"]], replica)
        for worker, stats in sorted(worker_stats.items())
        for replica in replicas(stats)
    ]
    up = GaugeMetricFamily("embedq_upstream_up", "1 while an upstream replica is in rotation.", labels=LABELS)
    in_flight = GaugeMetricFamily("embedq_upstream_in_flight", "Requests in flight to an upstream.", labels=LABELS)
    for labels, replica in rows:
        up.add_metric(labels, int(replica["state"] == "up"))
        in_flight.add_metric(labels, replica["in_flight"])
    yield up
    yield in_flight
    for name, help_text in COUNTERS.items():
        counter = CounterMetricFamily(f"embedq_upstream_{name}", help_text, labels=LABELS)
        for labels, replica in rows:
            counter.add_metric(labels, replica.get(name, 0))
        yield counter
    latency = HistogramMetricFamily(
        "embedq_upstream_request_duration_seconds", "Time an upstream request took.", labels=LABELS
    )
    for labels, replica in rows:
        bounds = [str(bound) for bound in replica["latency_bounds"]] + ["+Inf"]
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, replica["latency_counts"]):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric(labels, buckets, replica["latency_sum"])
    yield latency
