"""The replicas of an upstream model: which one takes a request, which are in rotation, and what
each has done (for `/health/ready` and `/metrics`).

- A request goes to the least-busy replica in rotation (in flight over its concurrency limit),
  waiting for a free slot up to its deadline.
- A connection error, a timeout, a 5xx (or any answer but a 2xx and the 4xx that judge the input)
  counts against its replica, and the request is tried once more, on another replica when there is
  one, after a short backoff. `failures` of them in a row (requests or health checks) take the
  replica out of rotation for the cool-down. A success clears the count.
- A thread per replica checks it with a real one-input embedding call every `every_s`. A failed
  check takes it out of rotation at once; a passing one brings it back, once its cool-down is over.
"""

from __future__ import annotations

import base64
import logging
import random
import threading
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

from common.errors import InvalidRequest, ServiceUnavailable
from common.registry import Upstream

log = logging.getLogger(__name__)

# Seconds, for the latency histogram in /metrics.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The statuses with which an upstream judges the input rather than itself: its message goes back
# to the caller as a 400, and the replica is not blamed.
INPUT_STATUSES = (400, 413, 422)
RETRY_BACKOFF_S = 0.05  # before the second try, doubled at random
HEALTH_INPUT = "embedq health check"


@dataclass
class ReplicaStats:
    requests: int = 0
    errors: int = 0  # requests that failed on this replica (each then tried again, or failed)
    retries: int = 0  # requests tried again after failing here
    cooldowns: int = 0  # times taken out of rotation for failing
    failed_checks: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # last: +Inf
    latency_sum: float = 0.0


class Replica:
    """One upstream server and what this worker knows of it. Its fields change under the pool's lock."""

    def __init__(self, upstream: Upstream, api_key: str | None):
        self.url, self.model, self.concurrency = upstream.url.rstrip("/"), upstream.model, upstream.concurrency
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.in_flight = 0
        self.failures = 0  # in a row
        self.checked_ok: bool | None = None  # the last health check's result; None before the first
        self.cool_until = 0.0
        self.last_error: str | None = None
        self.stats = ReplicaStats()

    def in_rotation(self, now: float) -> bool:
        return bool(self.checked_ok) and now >= self.cool_until

    def state(self, now: float) -> str:
        if now < self.cool_until:
            return "cooling"
        if self.checked_ok is None:
            return "starting"
        return "up" if self.checked_ok else "down"

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "model": self.model,
            "state": self.state(now),
            "in_flight": self.in_flight,
            "concurrency": self.concurrency,
            "last_error": self.last_error,
            **asdict(self.stats),
            "latency_bounds": LATENCY_BUCKETS,
        }


class UpstreamFailed(Exception):
    """A request a replica did not answer well: counted against it, and tried again."""


def upstream_message(response: httpx.Response) -> str:
    """The error message in an upstream's answer, in the shapes OpenAI, vLLM, TEI and FastAPI
    (Infinity) give it."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:1000] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
        detail = body.get("detail")
        if isinstance(detail, list):
            messages = [str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail]
            return "; ".join(dict.fromkeys(messages))[:1000]
        if detail:
            return str(detail)
    return response.text[:1000]


def vectors_of(body: dict[str, Any], count: int) -> list[np.ndarray]:
    """The vectors of an OpenAI-shaped embeddings answer, in input order (base64 or float lists)."""
    data = sorted(body.get("data") or [], key=lambda item: item["index"])
    if len(data) != count:
        raise UpstreamFailed(f"the upstream answered {len(data)} vectors for {count} inputs")
    return [
        np.frombuffer(base64.b64decode(e), "<f4").astype(np.float32)
        if isinstance(e := item["embedding"], str)
        else np.asarray(e, dtype=np.float32)
        for item in data
    ]


class ReplicaPool:
    def __init__(
        self,
        name: str,
        replicas: list[Replica],
        *,
        timeout_s: float,
        failures: int,
        cooldown_s: float,
        every_s: float,
    ):
        self.name, self.replicas = name, replicas
        self.timeout_s, self.failures, self.cooldown_s, self.every_s = timeout_s, failures, cooldown_s, every_s
        self.dim: int | None = None  # of the first vector a health check got back
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        slots = sum(r.concurrency for r in replicas) + len(replicas)  # the health checks too
        self._client = httpx.Client(
            timeout=timeout_s, limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
        )
        self._checkers = [
            threading.Thread(target=self._check_loop, args=(r,), name=f"embedq-upstream-check-{i}", daemon=True)
            for i, r in enumerate(replicas)
        ]

    @property
    def concurrency(self) -> int:
        return sum(r.concurrency for r in self.replicas)

    def start(self) -> None:
        for thread in self._checkers:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._checkers:
            thread.join(timeout=self.timeout_s + 1)
        self._client.close()

    def available(self) -> bool:
        now = time.monotonic()
        with self._cond:
            return any(r.in_rotation(now) for r in self.replicas)

    def free_slots(self) -> int:
        now = time.monotonic()
        with self._cond:
            return sum(r.concurrency - r.in_flight for r in self.replicas if r.in_rotation(now))

    def wait_checked(self, timeout_s: float) -> None:
        """Return once a replica has passed a health check; raise TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not any(r.checked_ok for r in self.replicas):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    errors = "; ".join(f"{r.url}: {r.last_error}" for r in self.replicas)
                    raise TimeoutError(f"no upstream of {self.name} answered within {timeout_s:g}s ({errors})")
                self._cond.wait(remaining)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._cond:
            return [r.snapshot(now) for r in self.replicas]

    # Requests

    def embed(self, payload: dict[str, Any], count: int) -> tuple[list[np.ndarray], dict[str, Any]]:
        """POST `payload` (an embeddings request without its `model`) to a replica, once more on
        failure: the `count` vectors in order, and the answer's `usage`."""
        deadline = time.monotonic() + self.timeout_s
        tried: list[Replica] = []
        for attempt in range(2):
            replica = self._acquire(tried, deadline)
            started = time.perf_counter()
            try:
                body = self._post(replica, payload)
                vectors = vectors_of(body, count)
            except UpstreamFailed as exc:
                self._failed(replica, str(exc), retried=attempt == 0)
                tried.append(replica)
                if attempt == 0:
                    time.sleep(RETRY_BACKOFF_S * (1 + random.random()))
                    continue
                raise ServiceUnavailable(f"The upstreams of {self.name} failed: {exc}") from None
            finally:
                self._release(replica, time.perf_counter() - started)
            self._succeeded(replica)
            return vectors, body.get("usage") or {}
        raise AssertionError("unreachable")

    def _post(self, replica: Replica, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = self._client.post(
                f"{replica.url}/embeddings", json={**payload, "model": replica.model}, headers=replica.headers
            )
        except httpx.HTTPError as exc:  # connection refused or reset, timeout, protocol error
            raise UpstreamFailed(f"{replica.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in INPUT_STATUSES:
            raise InvalidRequest(f"The upstream server refused the input: {upstream_message(response)}", "input")
        if response.status_code >= 300:
            raise UpstreamFailed(f"{replica.url}: HTTP {response.status_code}: {upstream_message(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamFailed(f"{replica.url}: an answer that is not JSON") from exc

    def _acquire(self, tried: list[Replica], deadline: float) -> Replica:
        """A slot on the least-busy replica in rotation, one not yet tried if there is one."""
        with self._cond:
            while True:
                now = time.monotonic()
                serving = [r for r in self.replicas if r.in_rotation(now)]
                if not serving:
                    raise ServiceUnavailable(f"No upstream of {self.name} is healthy right now; try again later.")
                untried = [r for r in serving if r not in tried] or serving
                free = [r for r in untried if r.in_flight < r.concurrency]
                if free:
                    replica = min(free, key=lambda r: (r.in_flight / r.concurrency, r.stats.requests))
                    replica.in_flight += 1
                    replica.stats.requests += 1
                    return replica
                if now >= deadline:
                    raise ServiceUnavailable(f"Every upstream of {self.name} stayed busy for {self.timeout_s:g}s.")
                # A replica may leave or join the rotation while every slot is taken: look again soon.
                self._cond.wait(min(deadline - now, 0.5))

    def _release(self, replica: Replica, seconds: float) -> None:
        with self._cond:
            replica.in_flight -= 1
            stats = replica.stats
            stats.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            stats.latency_sum += seconds
            self._cond.notify_all()

    def _succeeded(self, replica: Replica) -> None:
        with self._cond:
            replica.failures = 0

    def _failed(self, replica: Replica, error: str, *, retried: bool = False, check: bool = False) -> None:
        with self._cond:
            replica.last_error = error
            if check:
                replica.checked_ok = False
                replica.stats.failed_checks += 1
            else:
                replica.stats.errors += 1
                replica.stats.retries += retried
            replica.failures += 1
            if replica.failures >= self.failures and time.monotonic() >= replica.cool_until:
                replica.cool_until = time.monotonic() + self.cooldown_s
                replica.failures = 0
                replica.stats.cooldowns += 1
                log.warning("upstream %s out of rotation for %gs: %s", replica.url, self.cooldown_s, error)
        log.warning("upstream %s failed: %s", replica.url, error)

    # Health

    def _check_loop(self, replica: Replica) -> None:
        while not self._stopping.is_set():
            self._check(replica)
            self._stopping.wait(self.every_s)

    def _check(self, replica: Replica) -> None:
        payload = {"input": [HEALTH_INPUT], "encoding_format": "base64"}
        try:
            [vector] = vectors_of(self._post(replica, payload), 1)
        except (UpstreamFailed, InvalidRequest) as exc:
            self._failed(replica, str(exc), check=True)
            return
        with self._cond:
            if replica.checked_ok is not True:
                log.info("upstream %s is healthy", replica.url)
            replica.checked_ok, replica.failures, replica.last_error = True, 0, None
            self.dim = self.dim or len(vector)
            self._cond.notify_all()
