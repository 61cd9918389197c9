"""`GET /v1/models` and `GET /v1/models/{id}` in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..deps import RegistryDep
from ..schemas import ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def _card(request: Request, name: str) -> ModelCard:
    return ModelCard(id=name, created=request.app.state.models_created)


@router.get("", response_model=ModelList)
async def list_models(request: Request, registry: RegistryDep) -> ModelList:
    return ModelList(data=[_card(request, spec.name) for spec in registry])


@router.get("/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, registry: RegistryDep) -> ModelCard:
    return _card(request, registry.get(model_id).name)
