"""Flower for the embedq Celery app: workers, their queues and queue lengths, tasks; a web UI and an
HTTP API (`/api/workers`, `/api/queues/length`, `/api/tasks`).

Flower 2.2 reads Redis queue lengths from the broker itself; its `--broker_api` option is only for
RabbitMQ's management API. Auth, when Flower listens beyond loopback, comes from Flower's own
options or `FLOWER_*` variables (`FLOWER_BASIC_AUTH=user:password`, ...).
"""

from __future__ import annotations

import ipaddress
import os

from ..delivery.app import create_celery_app
from ..settings import get_settings

# Worker names carry their pid, so every restart adds a name; forget offline ones after this long.
PURGE_OFFLINE_WORKERS_S = 600


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def run_flower(address: str = "127.0.0.1", port: int = 5555) -> None:
    """Serve Flower in the foreground until SIGTERM / Ctrl-C."""
    if is_loopback(address):
        # Flower's HTTP API answers 401 unless auth is configured or this is set; only local users
        # can reach a loopback address, so the API may go without auth there.
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    create_celery_app(get_settings()).start(
        ["flower", f"--address={address}", f"--port={port}", f"--purge_offline_workers={PURGE_OFFLINE_WORKERS_S}"]
    )
