"""HTTP metrics of the API: a pure-ASGI middleware that counts requests by route template and status
and times them, into plain dicts that `GET /metrics` turns into Prometheus families at scrape time.

Each app gets its own counters (no prometheus_client globals), so several apps can live in one
process. Everything runs on the event loop thread, so the counters need no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from time import perf_counter

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds. Online embedding calls land between a few ms and a few s; jobs and SSE streams run longer.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The route label of requests no route matched: raw paths would give every scanner its own series.
UNMATCHED = "unmatched"


class _Latency:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0


class HttpStats:
    """Requests per (method, route template, status) and a latency histogram per (method, route)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str], _Latency] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        latency = self.latency.get((method, route))
        if latency is None:
            latency = self.latency[(method, route)] = _Latency()
        latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        latency.total += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "embedq_http_requests",
            "HTTP requests answered, by route template and status.",
            labels=["method", "route", "status"],
        )
        for labels, count in self.requests.items():
            requests.add_metric(labels, count)
        yield requests
        latency = HistogramMetricFamily(
            "embedq_http_request_duration_seconds",
            "Time from request to the end of the response.",
            labels=["method", "route"],
        )
        bounds = [str(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]
        for labels, histogram in self.latency.items():
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, histogram.counts):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(labels, buckets, histogram.total)
        yield latency


class RequestMetrics:
    """Counts and times every HTTP request into an `HttpStats`, which it puts on `app.state.http_stats`
    when the app starts (the `/metrics` route reads it from there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.stats = HttpStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                scope["app"].state.http_stats = self.stats
            return await self.app(scope, receive, send)
        started = perf_counter()
        status = 500  # what the client gets when the app raises before it starts a response

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The router puts the matched route in the scope: its path is the template, not the URL.
            route = scope.get("route")
            self.stats.observe(scope["method"], getattr(route, "path", UNMATCHED), status, perf_counter() - started)
