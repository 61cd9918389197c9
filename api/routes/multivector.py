"""`POST /v1/embeddings/text` and `/v1/embeddings/image`: late-interaction embeddings, pooled or
multi-vector. The image route takes JSON with base64 images, or a multipart upload of files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from common.errors import InvalidRequest
from common.inputs.images import decode_image_input, validate_image
from common.inputs.text import check_count, text_inputs
from common.registry import ModelSpec
from common.settings import Settings

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher, Embedded
from ..responses import embedding_list
from ..results import Gone
from ..schemas import ImageEmbeddingRequest, TextEmbeddingRequest, _LateInteractionOptions, parse

router = APIRouter(prefix="/v1/embeddings", tags=["late-interaction"])


def _output(spec: ModelSpec, options: _LateInteractionOptions) -> str:
    """The output asked for; a request that does not say gets token vectors where the model has them
    and its one vector per input where it has not (a single-vector Bi* model)."""
    if "output" not in options.model_fields_set:
        return "multivector" if spec.multivector else "pooled"
    if options.output == "multivector" and not spec.multivector:
        raise InvalidRequest(f"The model '{spec.name}' gives one vector per input; use output 'pooled'.", "output")
    return options.output


async def late_interaction(
    dispatcher: Dispatcher,
    gone: Gone,
    spec: ModelSpec,
    modality: str,
    inputs: list[dict[str, Any]],
    options: _LateInteractionOptions,
    **extra: Any,
) -> Embedded:
    """What the late-interaction routes compute: each input's token vectors, or its pooled vector."""
    output = _output(spec, options)
    return await dispatcher.embed(
        spec.name,
        modality,
        inputs,
        gone,
        cache=options.cache,
        output=output,
        normalize=options.normalize,
        dtype=options.dtype,
        **extra,
    )


async def _embed(
    dispatcher: Dispatcher,
    gone: Gone,
    spec: ModelSpec,
    modality: str,
    inputs: list[dict[str, Any]],
    options: _LateInteractionOptions,
    **extra: Any,
) -> Response:
    result = await late_interaction(dispatcher, gone, spec, modality, inputs, options, **extra)
    return embedding_list(spec.name, result, options.encoding_format, options.dtype, with_shape=True)


@router.post("/text", summary="Embed queries or text passages (pooled or multi-vector)")
async def embed_text(
    body: TextEmbeddingRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec = registry.get(body.model)
    inputs = text_inputs(body.input, settings.max_inputs)
    return await _embed(
        dispatcher, gone, spec, "text", inputs, body, input_type=body.input_type, truncate=body.truncate
    )


def image_inputs(images: list[bytes], settings: Settings) -> list[dict[str, Any]]:
    check_count(images, settings.max_images_per_request, "images")
    for data in images:
        validate_image(data, settings.max_image_pixels)
    return [{"image": data} for data in images]


async def _read_image_request(request: Request) -> tuple[ImageEmbeddingRequest, list[bytes]]:
    """The request's options and image bytes, from JSON or from a multipart form."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        files = [await f.read() for f in form.getlist("images") if not isinstance(f, str)]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return parse(ImageEmbeddingRequest, {**fields, "images": []}), files
    options = parse(ImageEmbeddingRequest, await request.body())
    return options, [decode_image_input(value) for value in options.images]


_IMAGE_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": ImageEmbeddingRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model", "images"],
                    "properties": {
                        "model": {"type": "string"},
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "output": {"type": "string", "enum": ["pooled", "multivector"]},
                        "normalize": {"type": "boolean"},
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                        "dtype": {"type": "string", "enum": ["float32", "float16"]},
                        "cache": {"type": "boolean"},
                    },
                }
            },
        },
        "required": True,
    }
}


@router.post("/image", summary="Embed page images (pooled or multi-vector)", openapi_extra=_IMAGE_BODY)
async def embed_image(
    request: Request, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    options, images = await _read_image_request(request)
    spec = registry.get(options.model)
    if "image" not in spec.modalities:
        raise InvalidRequest(f"The model '{spec.name}' does not embed images.", "model")
    return await _embed(dispatcher, gone, spec, "image", image_inputs(images, settings), options)
