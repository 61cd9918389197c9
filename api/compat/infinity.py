"""Infinity's routes without its `/v1` prefix (EMBEDQ_COMPAT=infinity): `POST /embeddings`,
`GET /models`; its Cohere-shaped `/rerank` is in api.compat.rerank. Shapes from Infinity's
libs/infinity_emb/infinity_emb/fastapi_schemas/pymodels.py and infinity_server.py. A request that
names no model (Infinity's `default/not-specified`) gets the first served model, as Infinity gives
its first engine. Errors have the OpenAI-style body Infinity's own have."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, Field

from common.registry import ModelSpec, Registry
from common.settings import Settings

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher
from ..responses import embedding_list, json_response
from ..results import Gone
from ..routes.embeddings import pooled_vectors
from ..routes.rerank import rank
from ..schemas import Body, EmbeddingInput, EmbeddingRequest, parse
from ..schemas import RerankRequest as NativeRerank

NOT_SPECIFIED = "default/not-specified"

router = APIRouter(tags=["compatibility: Infinity"])


class InfinityBody(Body):
    model_config = ConfigDict(extra="ignore")

    model: str = NOT_SPECIFIED


class EmbeddingsRequest(InfinityBody):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    dimensions: int = Field(default=0, ge=0, description="0: the model's full size.")
    modality: Literal["text"] = "text"


class RerankRequest(InfinityBody):
    query: str
    documents: list[str]
    return_documents: bool = False
    raw_scores: bool = False  # scores are cosines (MaxSim for late-interaction models) either way
    top_n: int | None = Field(default=None, gt=0)


def _spec(registry: Registry, name: str) -> ModelSpec:
    return next(iter(registry)) if name == NOT_SPECIFIED else registry.get(name)


@router.post("/embeddings", summary="Infinity: embeddings (OpenAI's shape, without /v1)")
async def embeddings(
    body: EmbeddingsRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    request = parse(
        EmbeddingRequest,
        dict(
            model=_spec(registry, body.model).name,
            input=body.input,
            encoding_format=body.encoding_format,
            dimensions=body.dimensions or None,
            user=body.user,
        ),
    )
    spec, result = await pooled_vectors(request, settings, registry, dispatcher, gone)
    return embedding_list(spec.name, result, body.encoding_format)


@router.get("/models", summary="Infinity: the served models and what each can do")
async def models(request: Request, registry: RegistryDep) -> dict:
    created = request.app.state.models_created
    return {
        "object": "list",
        "data": [
            {
                "id": spec.name,
                "object": "model",
                "owned_by": "embedq",
                "created": created,
                "backend": spec.backend,
                "capabilities": ["embed", "rerank", *(["image_embed"] if "image" in spec.modalities else [])],
            }
            for spec in registry
        ],
    }


async def rerank(raw: bytes, settings: Settings, registry: Registry, dispatcher: Dispatcher, gone: Gone) -> Response:
    """Infinity's `POST /rerank` (Cohere's shape): results best first, each document as a string."""
    body = parse(RerankRequest, raw)
    spec = _spec(registry, body.model)
    request = parse(NativeRerank, dict(model=spec.name, query=body.query, documents=body.documents, top_n=body.top_n))
    ranking = await rank(request, settings, registry, dispatcher, gone)
    results = [
        {
            "relevance_score": float(ranking.scores[i]),
            "index": i,
            **({"document": body.documents[i]} if body.return_documents else {}),
        }
        for i in ranking.order
    ]
    return json_response(
        {
            "object": "rerank",
            "results": results,
            "model": ranking.model,
            "usage": {"prompt_tokens": ranking.tokens, "total_tokens": ranking.tokens},
            "id": f"infinity-{uuid.uuid4()}",
            "created": int(time.time()),
        }
    )
