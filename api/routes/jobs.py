"""Ingestion jobs: poll (`GET`), cancel (`DELETE`), and follow over SSE (`/events`).

Events live in a Redis Stream per job, read for every client of this process by one reader that
fans them out (common.jobs.events), so a client that reconnects with `Last-Event-ID` gets every
event it missed; the stream ends after the final `completed`, `failed` or `cancelled` event.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Header, Response
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from common.errors import InvalidRequest, NotFound
from common.jobs.state import JobStore
from common.tenants import Principal

from ..deps import EventsDep, JobsDep, PrincipalDep
from ..responses import json_response

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_HEARTBEAT_S = 15
_EVENT_ID = re.compile(r"\d{1,20}(-\d{1,20})?")  # a Redis Stream entry id


async def _job(jobs: JobStore, job_id: str, caller: Principal) -> dict[str, Any]:
    """The job, if it is the caller's to see: another tenant's is not found."""
    job = await asyncio.to_thread(jobs.get, job_id)
    if not caller.owns(job["tenant"]):
        raise NotFound(f"No job '{job_id}'.", "job_id")
    return job


@router.get("/{job_id}", summary="A job's status and per-file progress")
async def get_job(job_id: str, jobs: JobsDep, caller: PrincipalDep) -> Response:
    return json_response(await _job(jobs, job_id, caller))


@router.delete("/{job_id}", summary="Cancel a job: pending pages and chunks are skipped")
async def cancel_job(job_id: str, jobs: JobsDep, caller: PrincipalDep) -> Response:
    await _job(jobs, job_id, caller)
    return json_response(await asyncio.to_thread(jobs.cancel, job_id))


@router.get("/{job_id}/events", summary="Server-sent progress events, resumable with Last-Event-ID")
async def job_events(
    job_id: str,
    jobs: JobsDep,
    feed: EventsDep,
    caller: PrincipalDep,
    last_event_id: str | None = Header(default=None),
) -> EventSourceResponse:
    if last_event_id is not None and not _EVENT_ID.fullmatch(last_event_id):
        raise InvalidRequest(
            "Last-Event-ID must be an event id this stream sent (like 1796170000000-0).", "Last-Event-ID"
        )
    await _job(jobs, job_id, caller)  # 404 for an unknown job, or another tenant's

    async def events():
        async for event_id, event, data in feed.follow(job_id, last_event_id):
            yield ServerSentEvent(data=data, event=event, id=event_id)

    return EventSourceResponse(events(), ping=_HEARTBEAT_S)
