"""Reading jobs' event streams (a Redis Stream per job, written by jobs.state) for SSE clients.

One `EventFeed` per API process reads every stream its clients follow with a single blocking
XREAD on one connection, and fans the entries out to them: 2,000 open streams cost one Redis
connection, not 2,000. A client starts from any event id: it replays what it missed with XRANGE
(a pooled connection, briefly), then gets the live entries; it stops after the final event, or at
once when it already has it (a reconnect after the end) or the job has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis import RedisError

from .. import keys
from .state import FINAL_EVENTS

log = logging.getLogger(__name__)

START = "0-0"  # the id before every event
Entry = tuple[str, str, str]  # (event id, event name, JSON data)


def _stream_id(value: str) -> tuple[int, int]:
    millis, _, sequence = value.partition("-")
    return int(millis), int(sequence or 0)


def _entry(entry_id: bytes, fields: dict[bytes, bytes]) -> Entry:
    return entry_id.decode(), fields[b"event"].decode(), fields[b"data"].decode()


class EventFeed:
    def __init__(self, client: aioredis.Redis, reader: aioredis.Redis, block_ms: int, idle_check_s: float = 30.0):
        """`client` answers the short calls (its pool is shared); `reader` holds the one blocking
        read. Each read blocks at most `block_ms`; a follower that gets nothing for
        `idle_check_s` looks whether its job has expired."""
        self._client, self._reader = client, reader
        self._block_ms, self._idle_check_s = block_ms, idle_check_s
        self._followers: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._read_from: dict[str, str] = {}  # stream -> the last id the reader has passed on
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="embedq-job-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def follow(self, job_id: str, after: str | None) -> AsyncIterator[Entry]:
        """The job's events after id `after` (all when None), as they come, ending after the final one."""
        stream = keys.job_events(job_id)
        cursor = after or START
        last = await self._client.xrevrange(stream, count=1)
        if not last:  # the job has expired
            return
        last_id, fields = last[0]
        if fields[b"event"].decode() in FINAL_EVENTS and _stream_id(last_id.decode()) <= _stream_id(cursor):
            return  # the client has the final event already
        queue: asyncio.Queue = asyncio.Queue()
        if stream not in self._read_from:
            self._read_from[stream] = last_id.decode()
        self._followers[stream].add(queue)
        try:
            # What the client missed: up to where the reader starts, and a little past it.
            while batch := await self._client.xrange(stream, min=f"({cursor}", max="+", count=100):
                for raw in batch:
                    cursor, event, data = _entry(*raw)
                    yield cursor, event, data
                    if event in FINAL_EVENTS:
                        return
                if _stream_id(cursor) >= _stream_id(self._read_from.get(stream, cursor)):
                    break
            while True:
                try:
                    entry_id, event, data = await asyncio.wait_for(queue.get(), self._idle_check_s)
                except asyncio.TimeoutError:
                    if not await self._client.exists(stream):
                        return
                    continue
                if _stream_id(entry_id) <= _stream_id(cursor):
                    continue  # replayed already
                cursor = entry_id
                yield entry_id, event, data
                if event in FINAL_EVENTS:
                    return
        finally:
            self._followers[stream].discard(queue)
            if not self._followers[stream]:
                del self._followers[stream]
                self._read_from.pop(stream, None)

    async def _read_forever(self) -> None:
        while True:
            streams = {stream: self._read_from[stream] for stream in list(self._followers) if stream in self._read_from}
            if not streams:
                await asyncio.sleep(self._block_ms / 1000)
                continue
            try:
                batches = await self._reader.xread(streams, block=self._block_ms, count=100)
            except RedisError as exc:
                log.warning("reading job events failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            for raw_stream, entries in batches:
                stream = raw_stream.decode()
                for raw in entries:
                    entry = _entry(*raw)
                    if stream in self._read_from:
                        self._read_from[stream] = entry[0]
                    for queue in list(self._followers.get(stream, ())):
                        queue.put_nowait(entry)
