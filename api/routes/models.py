"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape; a model's card also says what it
can do (`capabilities`), from models.yaml and from its live workers, for a client or router to
check a model before it sends."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Request

from common import keys
from common.delivery.heartbeat import live_workers
from common.registry import ModelSpec
from common.settings import Settings

from ..deps import RedisDep, RegistryDep, SettingsDep
from ..schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(request: Request, name: str, capabilities: dict[str, Any] | None = None) -> ModelCard:
    return ModelCard(id=name, created=request.app.state.models_created, capabilities=capabilities)


async def capabilities(spec: ModelSpec, client: aioredis.Redis, settings: Settings) -> dict[str, Any]:
    """What `spec` takes and gives, with what its live workers report (each worker's stats hash,
    refreshed with its heartbeat): the vectors' size, the weights' float type, the devices."""
    async with client.pipeline(transaction=False) as pipe:
        for modality in spec.modalities:
            live_workers(pipe, keys.workers_alive(spec.name, modality), settings.worker_heartbeat_ttl_s)
        live = await pipe.execute()
    workers = sorted({member.decode() for members in live for member in members})
    async with client.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.hgetall(keys.worker_stats(worker))
        stats = [{k.decode(): v.decode() for k, v in found.items()} for found in await pipe.execute()]
    reported = [entry for entry in stats if entry]
    dims = {int(entry["dim"]) for entry in reported if entry.get("dim", "0") != "0"}
    dtypes = {entry["dtype"] for entry in reported if entry.get("dtype")}
    return {
        "modalities": list(spec.modalities),
        "outputs": ["pooled", "multivector"] if spec.multivector else ["pooled"],
        "multivector": spec.multivector,
        "dimension": max(dims) if dims else spec.dim,
        "dimensions": list(spec.dimensions),  # the Matryoshka sizes `dimensions` takes
        "max_input_tokens": spec.token_limit,
        "dtype": dtypes.pop() if len(dtypes) == 1 else spec.dtype,
        "devices": sorted({entry["device"] for entry in reported if entry.get("device")}),
        "workers_live": {modality: len(members) for modality, members in zip(spec.modalities, live)},
        "backend": spec.backend,
    }


@router.get("", response_model=ModelList, response_model_exclude_none=True)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    return ModelList(data=[_card(request, spec.name) for spec in registry])


@router.get("/{model_id:path}", response_model=ModelCard)
async def get_model(
    model_id: str, request: Request, registry: RegistryDep, client: RedisDep, settings: SettingsDep
) -> ModelCard:
    spec = registry.get(model_id)
    return _card(request, spec.name, await capabilities(spec, client, settings))
