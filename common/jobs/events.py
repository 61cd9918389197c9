"""Reading a job's event stream (a Redis Stream per job, written by jobs.state), for SSE clients:
from any event id on, ending after the final event, and at once for a client that already has it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from .. import keys
from .state import FINAL_EVENTS

START = "0-0"  # the id before every event


async def follow(
    client: aioredis.Redis, job_id: str, after: str | None, block_ms: int
) -> AsyncIterator[tuple[str, str, str]]:
    """(event id, event name, JSON data) for each event after id `after` (all when None), as they
    come; returns after a final event (`completed`, `failed`, `cancelled`), or when the stream is
    gone or ended before `after`. Each read blocks at most `block_ms`."""
    stream = keys.job_events(job_id)
    cursor = after or START
    while True:
        batches = await client.xread({stream: cursor}, block=block_ms, count=100)
        for _, entries in batches:
            for entry_id, fields in entries:
                cursor = entry_id.decode()
                event = fields[b"event"].decode()
                yield cursor, event, fields[b"data"].decode()
                if event in FINAL_EVENTS:
                    return
        if not batches and await _ended_before(client, stream, cursor):
            return


async def _ended_before(client: aioredis.Redis, stream: str, cursor: str) -> bool:
    """True when the stream's last event is final and the client has it already (or the job
    expired), so a client reconnecting after the end is not kept waiting."""
    last = await client.xrevrange(stream, count=1)
    if not last:
        return True
    entry_id, fields = last[0]
    return fields[b"event"].decode() in FINAL_EVENTS and _stream_id(entry_id.decode()) <= _stream_id(cursor)


def _stream_id(value: str) -> tuple[int, int]:
    millis, _, sequence = value.partition("-")
    return int(millis), int(sequence or 0)
