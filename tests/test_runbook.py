"""docs/runbook.md against the code: every symptom has its section, and every metric, `/health/ready`
field, setting and log line or error message it quotes is one the code exports, returns, reads or
writes (a runbook that names a metric nobody exports sends the on-call engineer nowhere)."""

from __future__ import annotations

import json
import re

import pytest

from api import upstreams
from api.metrics import HttpStats
from api.routes.metrics import RedisReading, render
from common.settings import Settings

from .conftest import ROOT
from .deployment import setting_variables

RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()
FLAT = " ".join(RUNBOOK.split())  # quotes wrap across lines
SOURCE = "\n".join(path.read_text() for top in ("api", "common", "workers") for path in (ROOT / top).rglob("*.py"))
SYMPTOMS = [
    "A worker is not ready",
    "A queue is growing",
    "A GPU runs out of memory",
    "Redis is full, or was restarted",
    "Milvus is down",
    "A job is stuck",
    "An upstream is down",
]
# What the runbook quotes from logs and error bodies, `<...>` standing for what varies.
QUOTED = [
    "model <name> loaded and warmed on <device> in <s>s",
    "worker <name> ready on queues <queues>",
    "embedq: <name> exited with <code>; starting it again in <s>s",
    "heartbeat to Redis failed: <error>",
    "batcher thread died",
    "The batcher stopped: ...",
    "No worker is serving <model (modality)> right now; try again later.",
    "no live worker serves <model> (<modality>)",
    "no live ingestion worker",
    "The queue for <queue> is full (<n> waiting); retry later.",
    "This server is waiting on <n> requests already; retry shortly.",
    "batch of <n> failed",
    "out of memory on a batch of <n>; splitting",
    "The model failed on this batch: <the CUDA out-of-memory error>",
    "The queue is not reachable right now (<error type>); try again shortly.",
    "Redis restarted; senders will look for tasks it lost",
    "task <id> of job <id> vanished with a dead worker; sending it again",
    "embedq: embedded Redis on <url>",
    "The vector store at <uri> is not reachable: <error>",
    "The vector store failed: <message>",
    "Milvus is not reachable (<error>); trying again in <s>s",
    "indexing <what> of job <id> failed",
    "catching up with the collections failed (<error>); retrying",
    "<reason> for <n>s (EMBEDQ_JOB_STALL_TIMEOUT_S)",
    "job <id> waited <n>s with <reason>; failing it",
    "upstream <url> failed: <error>",
    "upstream <url> out of rotation for <s>s: <error>",
    "upstream <url> is healthy",
]
# Defaults the runbook states, as it states them.
DEFAULTS = {
    "queue_limit": 10_000,
    "worker_heartbeat_ttl_s": 15,
    "result_expires_s": 600,
    "job_ttl_s": 7 * 24 * 3600,
    "store_outage_s": 60,
    "job_stall_timeout_s": 600,
    "max_deliveries": 3,
}


def exported_metrics() -> set[str]:
    """The sample names `/metrics` writes with every family filled, and the histograms' base names."""
    http = HttpStats()
    http.observe("GET", "/health/live", 200, 0.001)
    replica = {"url": "http://u", "model": "m", "state": "up", "in_flight": 0, "concurrency": 1}
    replica |= {"latency_bounds": [0.1], "latency_counts": [1, 0], "latency_sum": 0.05}
    stats = {"model": "m", "device": "cpu", "batches": "1", "items": "1", "upstreams": json.dumps([replica])}
    reading = RedisReading(
        queue_depth={("m", "text"): 1},
        workers_alive={("m", "text"): 1},
        worker_stats={"m@h": stats},
        items={"sent:m:text": 1, "embedded:m:text": 1},
        search_stats={"s@h": {"kernel": "int8", "cpu": "AVX2", "pages": "1"}},
    )
    lines = render(http, reading).decode().splitlines()
    names = {line.split("{")[0].split(" ")[0] for line in lines if not line.startswith("#")}
    return names | {re.sub(r"_(bucket|count|sum)$", "", name) for name in names}


def test_every_symptom_has_its_section():
    headings = re.findall(r"^## (.+)$", RUNBOOK, re.MULTILINE)
    for symptom in SYMPTOMS:
        assert symptom in headings, symptom
        section = RUNBOOK.split(f"## {symptom}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**You see:**", "**Check:**", "**Fix:**"):
            assert part in section or symptom.startswith("Redis"), f"{symptom}: no {part}"


def test_the_metrics_it_names_are_exported():
    exported = exported_metrics()
    named = set(re.findall(r"\bembedq_[a-z0-9_]+", RUNBOOK))
    assert {"embedq_queue_depth", "embedq_worker_oom_splits_total", "embedq_upstream_up"} <= named
    assert named <= exported, f"not exported: {sorted(named - exported)}"


def test_the_health_fields_it_names_are_returned():
    health = (ROOT / "api" / "routes" / "health.py").read_text()
    for field in ["status", "redis", "workers", "ingest_workers", "search_workers", "upstreams", "failing"]:
        assert f"`{field}`" in RUNBOOK or f'"{field}"' in RUNBOOK, field
        assert f'"{field}":' in health, field
    for field in ["url", "state", "in_flight", "last_error"]:
        assert field in upstreams.SHOWN and f"`{field}`" in RUNBOOK, field
    for state in ["ready", "starting", "unavailable"]:
        assert f'"{state}"' in health and f'"status": "{state}"' in RUNBOOK, state


def test_the_settings_it_names_are_read_with_the_defaults_it_states():
    named = set(re.findall(r"\bEMBEDQ_[A-Z0-9_]+", RUNBOOK))
    assert named <= setting_variables(), f"not settings: {sorted(named - setting_variables())}"
    settings = Settings(_env_file=None)
    for name, default in DEFAULTS.items():
        assert getattr(settings, name) == default, name


@pytest.mark.parametrize("quoted", QUOTED)
def test_each_quoted_line_is_in_the_runbook_and_in_the_code(quoted):
    assert f"`{quoted}" in FLAT, quoted
    pattern = re.escape(quoted).replace(re.escape("..."), ".*?")
    pattern = re.sub(r"<[^>]+>", ".+?", pattern.replace("\\<", "<").replace("\\>", ">"))
    assert re.search(pattern, SOURCE), f"no log line or message in the code reads: {quoted}"
