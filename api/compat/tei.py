"""Hugging Face text-embeddings-inference's routes (EMBEDQ_COMPAT=tei): `POST /embed` (and `POST /`,
where TEI serves an embedding model's), `/embed_all`, `/tokenize`, `GET /info`, `/health`; its `/rerank` is in
api.compat.rerank. Shapes from TEI's router/src/http/types.rs and server.rs (its `ErrorResponse`
and status table): errors are `{"error", "error_type"}` with TEI's statuses: 400 `empty`, 413
`validation` for more inputs than `max_client_batch_size` (EMBEDQ_MAX_INPUTS; TEI's documented
status, and its answer before 1.9), 422 `validation` for any other refused input, 424 `backend`,
429 `overloaded`, 503 `unhealthy`.

TEI serves one model: these routes serve EMBEDQ_COMPAT_TEI_MODEL (api.compat.models)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ConfigDict

from common.errors import (
    EmbedqError,
    EmptyInput,
    InvalidRequest,
    QueueFull,
    ServiceUnavailable,
    TooLarge,
    TooManyInputs,
)
from common.inputs.text import text_inputs
from common.registry import ModelSpec, Registry
from common.settings import Settings

from ..deps import DispatcherDep, GoneDep, RedisDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher
from ..errors import ErrorResponse, validation_message
from ..responses import json_response
from ..results import Gone
from ..routes.embeddings import pooled_vectors
from ..routes.models import capabilities
from ..routes.rerank import rank
from ..routes.tokenize import token_lists
from ..schemas import Body, EmbeddingInput, EmbeddingRequest, parse
from ..schemas import RerankRequest as NativeRerank
from .models import tei_model

Direction = Literal["right", "Right", "left", "Left"]
POOLING = {"mean": "mean", "cls": "cls", "last_token": "last-token"}  # TEI's names


def error(exc: EmbedqError | RequestValidationError) -> ErrorResponse:
    """An embedq error, or a body FastAPI refused, as TEI answers it."""
    if isinstance(exc, RequestValidationError):
        status, kind, message = 422, "validation", validation_message(exc)[0]
    else:
        status, kind = _status(exc)
        message = exc.message
    return ErrorResponse({"error": message, "error_type": kind}, status)


def _status(exc: EmbedqError) -> tuple[int, str]:
    if isinstance(exc, EmptyInput):
        return 400, "empty"
    if isinstance(exc, (TooManyInputs, TooLarge)):
        return 413, "validation"
    if isinstance(exc, QueueFull):
        return 429, "overloaded"
    if isinstance(exc, ServiceUnavailable):
        return 503, "unhealthy"
    if exc.status < 500:
        return 422, "validation"
    return 424, "backend"


async def translated(answer: Awaitable[Response]) -> Response:
    try:
        return await answer
    except (EmbedqError, RequestValidationError) as exc:
        return error(exc)


class TeiRoute(APIRoute):
    """A route whose errors take TEI's body and statuses."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await translated(handle(request))

        return route


router = APIRouter(tags=["compatibility: TEI"], route_class=TeiRoute)


class TeiBody(Body):
    """TEI ignores the fields it does not know (serde's default)."""

    model_config = ConfigDict(extra="ignore")


class _Options(TeiBody):
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: str | None = None

    def truncation(self) -> bool:
        if self.truncation_direction.lower() == "left":
            raise InvalidRequest("truncation_direction 'left' is not supported: inputs are cut on the right.")
        return True if self.truncate is None else self.truncate  # TEI's --auto-truncate is on by default

    def input_type(self) -> str:
        """TEI's sentence-transformers prompt names, as embedq's input types."""
        if self.prompt_name in (None, "document", "passage"):
            return "document"
        if self.prompt_name == "query":
            return "query"
        raise InvalidRequest(f"prompt_name '{self.prompt_name}' is not known: use 'query' or 'document'.")


class EmbedRequest(_Options):
    inputs: EmbeddingInput
    normalize: bool = True
    dimensions: int | None = None


class EmbedAllRequest(_Options):
    inputs: EmbeddingInput


class TokenizeRequest(TeiBody):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


def _spec(registry: Registry, settings: Settings) -> ModelSpec:
    return tei_model(registry, settings.compat_tei_model)


@router.post("/embed", summary="TEI: embed (one pooled vector per input)")
@router.post("/", summary="TEI: embed, at the root as TEI serves an embedding model")
async def embed(
    body: EmbedRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    request = parse(
        EmbeddingRequest,
        {
            "model": _spec(registry, settings).name,
            "input": body.inputs,
            "dimensions": body.dimensions,
            "normalize": body.normalize,
            "input_type": body.input_type(),
            "truncate": body.truncation(),
        },
    )
    _, result = await pooled_vectors(request, settings, registry, dispatcher, gone)
    return json_response(result.arrays)


@router.post("/embed_all", summary="TEI: every token's vector")
async def embed_all(
    body: EmbedAllRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    """A text model's last hidden state per token, as TEI gives it (not normalized); a
    late-interaction model's token vectors."""
    spec = _spec(registry, settings)
    inputs = text_inputs(body.inputs, settings.max_inputs)
    result = await dispatcher.embed(
        spec.name,
        "text",
        inputs,
        gone,
        output="tokens",
        normalize=False,
        input_type=body.input_type(),
        truncate=body.truncation(),
    )
    return json_response(result.arrays)


@router.post("/tokenize", summary="TEI: tokenize (offsets in bytes, as TEI gives them)")
async def tokenize(
    body: TokenizeRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec = _spec(registry, settings)
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    input_type = _Options(prompt_name=body.prompt_name).input_type()
    lists = await token_lists(spec, texts, settings, dispatcher, gone, input_type, body.add_special_tokens)
    return json_response([[_in_bytes(entry["text"], token) for token in entry["tokens"]] for entry in lists])


def _in_bytes(text: str, token: dict[str, Any]) -> dict[str, Any]:
    """TEI's offsets count UTF-8 bytes (Rust's tokenizers); embedq's count characters."""
    if token["start"] is None:
        return token
    start = len(text[: token["start"]].encode())
    return {**token, "start": start, "stop": start + len(token["text"].encode())}


class RerankRequest(TeiBody):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False  # scores are cosines (MaxSim for late-interaction models) either way
    return_text: bool = False


async def rerank(fields: bytes, settings: Settings, registry: Registry, dispatcher: Dispatcher, gone: Gone) -> Response:
    """TEI's `POST /rerank`: `[{index, score, text?}]`, best first."""
    body = parse(RerankRequest, fields)
    truncate = _Options(truncate=body.truncate, truncation_direction=body.truncation_direction).truncation()
    request = parse(
        NativeRerank,
        dict(model=_spec(registry, settings).name, query=body.query, documents=body.texts, truncate=truncate),
    )
    ranking = await rank(request, settings, registry, dispatcher, gone)
    return json_response(
        [
            {"index": i, "score": float(ranking.scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
            for i in ranking.order
        ]
    )


@router.get("/health", summary="TEI: 200 while the model has a live worker (never behind auth)")
async def health(settings: SettingsDep, registry: RegistryDep, client: RedisDep) -> Response:
    found = await capabilities(_spec(registry, settings), client, settings)
    if not found["workers_live"].get("text"):
        raise ServiceUnavailable("unhealthy")
    return Response(status_code=200)


@router.get("/info", summary="TEI: the served model and the router's limits")
async def info(request: Request, settings: SettingsDep, registry: RegistryDep, client: RedisDep) -> dict[str, Any]:
    spec = _spec(registry, settings)
    found = await capabilities(spec, client, settings)
    return {
        "model_id": spec.name,
        "model_sha": None,
        "model_dtype": found["dtype"],
        "served_model_name": spec.name,
        "model_type": {"embedding": {"pooling": "none" if spec.multivector else POOLING[spec.pooling]}},
        "max_concurrent_requests": settings.max_in_flight,
        "max_input_length": spec.token_limit,
        "max_batch_tokens": spec.batch_token_budget,
        "max_batch_requests": spec.max_batch_size,
        "max_client_batch_size": settings.max_inputs,
        "auto_truncate": True,
        "tokenization_workers": found["workers_live"].get("text", 0),
        "version": request.app.version,
        "sha": None,
        "docker_label": None,
    }
