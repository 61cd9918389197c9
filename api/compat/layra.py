"""LAYRA's ColQwen2.5 model server (EMBEDQ_COMPAT=layra): `POST /embed_text` with
`{"queries": [...]}` and `POST /embed_image` with the multipart files `images`, each answering
`{"embeddings": [...]}`, one list of token vectors per query or page, which LAYRA's backend reads
(backend/app/rag/get_embedding.py) and writes to Milvus; and `GET /healthy-check`, its compose
healthcheck. Shapes from LAYRA's model-server/model_server.py. Its requests name no model: they get
EMBEDQ_COMPAT_LAYRA_MODEL (api.compat.models)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict

from common.errors import InvalidRequest
from common.inputs.text import text_inputs

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..responses import json_response
from ..routes.multivector import image_inputs, late_interaction
from ..schemas import Body, ImageEmbeddingRequest, TextEmbeddingRequest, parse
from .models import layra_model

router = APIRouter(tags=["compatibility: LAYRA"])


class TextRequest(Body):
    model_config = ConfigDict(extra="ignore")

    queries: list[str]


@router.post("/embed_text", summary="LAYRA: each query's token vectors")
async def embed_text(
    body: TextRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec = layra_model(registry, settings.compat_layra_model)
    options = parse(TextEmbeddingRequest, dict(model=spec.name, input=body.queries, output="multivector"))
    inputs = text_inputs(body.queries, settings.max_inputs)
    result = await late_interaction(dispatcher, gone, spec, "text", inputs, options, input_type="query", truncate=True)
    return json_response({"embeddings": result.arrays})


@router.post(
    "/embed_image",
    summary="LAYRA: each page image's token vectors (multipart files `images`)",
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    }
                }
            },
            "required": True,
        }
    },
)
async def embed_image(
    request: Request, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("Send the pages as multipart/form-data files named 'images'.", "images")
    form = await request.form()
    images = [await part.read() for part in form.getlist("images") if not isinstance(part, str)]
    spec = layra_model(registry, settings.compat_layra_model)
    options = ImageEmbeddingRequest(model=spec.name, images=[], output="multivector")
    result = await late_interaction(dispatcher, gone, spec, "image", image_inputs(images, settings), options)
    return json_response({"embeddings": result.arrays})


@router.get("/healthy-check", summary="LAYRA: the process answers (never behind auth)")
async def healthy_check() -> dict:
    return {"status": "UP", "details": "All systems operational"}
