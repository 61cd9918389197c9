"""Ingestion jobs: poll (`GET`), cancel (`DELETE`), and follow over SSE (`/events`).

Events live in a Redis Stream per job, so a client that reconnects with `Last-Event-ID` gets
every event it missed; the stream ends after the final `completed`, `failed` or `cancelled` event.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Header, Request, Response
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from common import keys
from common.jobs import FINAL_EVENTS

from ..deps import Authorized, RedisDep
from ..responses import json_response

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=Authorized)

_READ_BLOCK_MS = 1000  # under the Redis client's socket timeout
_HEARTBEAT_S = 15


@router.get("/{job_id}", summary="A job's status and per-file progress")
async def get_job(job_id: str, request: Request) -> Response:
    return json_response(await asyncio.to_thread(request.app.state.jobs.get, job_id))


@router.delete("/{job_id}", summary="Cancel a job: pending pages and chunks are skipped")
async def cancel_job(job_id: str, request: Request) -> Response:
    return json_response(await asyncio.to_thread(request.app.state.jobs.cancel, job_id))


@router.get("/{job_id}/events", summary="Server-sent progress events, resumable with Last-Event-ID")
async def job_events(
    job_id: str, request: Request, client: RedisDep, last_event_id: str | None = Header(default=None)
) -> EventSourceResponse:
    await asyncio.to_thread(request.app.state.jobs.get, job_id)  # 404 for an unknown job
    stream = keys.job_events(job_id)

    async def events():
        cursor = last_event_id or "0-0"
        while True:
            batches = await client.xread({stream: cursor}, block=_READ_BLOCK_MS, count=100)
            for _, entries in batches:
                for entry_id, fields in entries:
                    cursor = entry_id.decode()
                    event = fields[b"event"].decode()
                    yield ServerSentEvent(data=fields[b"data"].decode(), event=event, id=cursor)
                    if event in FINAL_EVENTS:
                        return
            if not batches and await _ended_before(client, stream, cursor):
                return

    return EventSourceResponse(events(), ping=_HEARTBEAT_S)


async def _ended_before(client, stream: str, cursor: str) -> bool:
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
