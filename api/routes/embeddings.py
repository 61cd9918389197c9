"""`POST /v1/embeddings`: OpenAI-compatible text embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from common.errors import InvalidRequest
from common.registry import ModelSpec

from ..deps import Authorized, DispatcherDep, RegistryDep, SettingsDep
from ..responses import embedding_list
from ..schemas import EmbeddingRequest

router = APIRouter(prefix="/v1", tags=["embeddings"], dependencies=Authorized)


def check_count(items: list, max_items: int, param: str) -> None:
    if not items:
        raise InvalidRequest(f"'{param}' must not be empty.", param)
    if len(items) > max_items:
        raise InvalidRequest(f"'{param}' has {len(items)} items; at most {max_items} are allowed per request.", param)


def text_inputs(raw: Any, max_inputs: int) -> list[dict[str, Any]]:
    """OpenAI's four input shapes -> one `{"text"}` or `{"token_ids"}` entry per input."""
    if isinstance(raw, str):
        raw = [raw]
    check_count(raw, max_inputs, "input")
    if isinstance(raw[0], int):
        raw = [raw]
    if isinstance(raw[0], str):
        if any(text == "" for text in raw):
            raise InvalidRequest("'input' must not contain empty strings.", "input")
        return [{"text": text} for text in raw]
    if any(len(ids) == 0 for ids in raw):
        raise InvalidRequest("'input' must not contain empty token lists.", "input")
    return [{"token_ids": ids} for ids in raw]


def check_dimensions(spec: ModelSpec, dimensions: int | None) -> None:
    if dimensions is None:
        return
    if not spec.dimensions:
        raise InvalidRequest(f"The model '{spec.name}' does not support 'dimensions'.", "dimensions")
    if dimensions not in spec.dimensions:
        raise InvalidRequest(f"'dimensions' must be one of {spec.dimensions} for '{spec.name}'.", "dimensions")


@router.post("/embeddings", summary="Create embeddings (OpenAI-compatible)")
async def create_embeddings(
    body: EmbeddingRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep
) -> Response:
    spec = registry.get(body.model)
    inputs = text_inputs(body.input, settings.max_inputs)
    check_dimensions(spec, body.dimensions)
    result = await dispatcher.embed(
        spec.name,
        "text",
        inputs,
        output="pooled",
        normalize=body.normalize,
        dimensions=body.dimensions,
        input_type=body.input_type,
        truncate=body.truncate,
    )
    return embedding_list(spec.name, result, body.encoding_format)
