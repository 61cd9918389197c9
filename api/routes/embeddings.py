"""`POST /v1/embeddings`: OpenAI-compatible text embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Response

from common.errors import InvalidRequest
from common.inputs.text import text_inputs
from common.registry import ModelSpec

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..responses import embedding_list
from ..schemas import EmbeddingRequest

router = APIRouter(prefix="/v1", tags=["embeddings"])


def check_dimensions(spec: ModelSpec, dimensions: int | None) -> None:
    if dimensions is None:
        return
    if not spec.dimensions:
        raise InvalidRequest(f"The model '{spec.name}' does not support 'dimensions'.", "dimensions")
    if dimensions not in spec.dimensions:
        raise InvalidRequest(f"'dimensions' must be one of {spec.dimensions} for '{spec.name}'.", "dimensions")


@router.post("/embeddings", summary="Create embeddings (OpenAI-compatible)")
async def create_embeddings(
    body: EmbeddingRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec = registry.get(body.model)
    inputs = text_inputs(body.input, settings.max_inputs)
    check_dimensions(spec, body.dimensions)
    result = await dispatcher.embed(
        spec.name,
        "text",
        inputs,
        gone,
        cache=body.cache,
        output="pooled",
        normalize=body.normalize,
        dimensions=body.dimensions,
        input_type=body.input_type,
        truncate=body.truncate,
    )
    return embedding_list(spec.name, result, body.encoding_format)
