"""`POST /v1/embeddings`: OpenAI-compatible text embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Response

from common.errors import InvalidRequest
from common.inputs.text import text_inputs
from common.registry import ModelSpec, Registry
from common.settings import Settings

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher, Embedded
from ..responses import embedding_list
from ..results import Gone
from ..schemas import EmbeddingRequest

router = APIRouter(prefix="/v1", tags=["embeddings"])


def check_dimensions(spec: ModelSpec, dimensions: int | None) -> None:
    if dimensions is None:
        return
    if not spec.dimensions:
        raise InvalidRequest(f"The model '{spec.name}' does not support 'dimensions'.", "dimensions")
    if dimensions not in spec.dimensions:
        raise InvalidRequest(f"'dimensions' must be one of {spec.dimensions} for '{spec.name}'.", "dimensions")


async def pooled_vectors(
    body: EmbeddingRequest, settings: Settings, registry: Registry, dispatcher: Dispatcher, gone: Gone
) -> tuple[ModelSpec, Embedded]:
    """What `POST /v1/embeddings` computes for `body`: the model and one vector per input."""
    spec = registry.get(body.model)
    inputs = text_inputs(body.input, settings.max_inputs)
    check_dimensions(spec, body.dimensions)
    return spec, await dispatcher.embed(
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


@router.post("/embeddings", summary="Create embeddings (OpenAI-compatible)")
async def create_embeddings(
    body: EmbeddingRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec, result = await pooled_vectors(body, settings, registry, dispatcher, gone)
    return embedding_list(spec.name, result, body.encoding_format)
