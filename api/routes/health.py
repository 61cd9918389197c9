"""Health: `/healthz` and `/health/live` (the process answers), `/health/ready` (Redis answers and
every served model has a live, warmed worker for each of its modalities; it also counts the live
ingestion and search workers, which uploads and page searches need, the state of each upstream
server of the models that such servers compute, and, under `embedq up`, names the processes that
keep failing). Never behind auth."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from common import keys
from common.delivery.heartbeat import live_workers

from .. import upstreams
from ..deps import RedisDep, RegistryDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/health/live")
async def live() -> dict:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(client: RedisDep, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    wanted = [(spec.name, modality) for spec in registry for modality in spec.modalities]
    try:
        async with client.pipeline(transaction=False) as pipe:
            for key in [
                *(keys.workers_alive(model, modality) for model, modality in wanted),
                keys.INGEST_WORKERS_ALIVE,
                keys.SEARCH_WORKERS_ALIVE,
            ]:
                live_workers(pipe, key, settings.worker_heartbeat_ttl_s)
            pipe.hgetall(keys.STACK_CHILDREN)
            *members, stack = await pipe.execute()
        fronting = await upstreams.read(client, settings.worker_heartbeat_ttl_s)
    except Exception as exc:
        return JSONResponse({"status": "unavailable", "redis": f"error: {exc}"}, 503)
    *counts, ingest_workers, search_workers = map(len, members)
    workers = {f"{model}/{modality}": count for (model, modality), count in zip(wanted, counts)}
    children = {name.decode(): json.loads(state) for name, state in stack.items()}
    ok = all(counts)
    return JSONResponse(
        {
            "status": "ready" if ok else "starting",
            "redis": "ok",
            "workers": workers,
            "ingest_workers": ingest_workers,
            "search_workers": search_workers,
            "upstreams": upstreams.ready_view(fronting),
            # Under `embedq up`: the processes it restarts again and again.
            "failing": sorted(name for name, state in children.items() if state["failing"]),
        },
        200 if ok else 503,
    )
