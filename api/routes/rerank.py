"""`POST /v1/rerank`: score documents (texts or page images) against a query, best first, in
Cohere's and TEI's shape.

The query and the documents are embedded through the model's queues like any other request, so
they batch with other traffic. Late-interaction models score by MaxSim over the token vectors
(colpali-engine's `score_multi_vector`); every other model by the cosine of pooled vectors.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Response

from common.errors import InvalidRequest
from common.inputs.images import decode_image_input
from common.inputs.text import check_count
from common.registry import Registry
from common.settings import Settings
from common.vectors import maxsim

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher
from ..responses import json_response
from ..results import Gone
from ..schemas import RerankRequest
from .multivector import image_inputs

router = APIRouter(prefix="/v1", tags=["rerank"])


@dataclass
class Ranking:
    """Documents scored against a query: their indexes best first (at most top_n) and scores."""

    model: str
    order: list[int]
    scores: np.ndarray
    tokens: int


async def rank(
    body: RerankRequest, settings: Settings, registry: Registry, dispatcher: Dispatcher, gone: Gone
) -> Ranking:
    """What `POST /v1/rerank` computes for `body`, before it is shaped as an answer."""
    spec = registry.get(body.model)
    if "text" not in spec.modalities:
        raise InvalidRequest(f"The model '{spec.name}' does not embed text queries.", "model")
    if body.images is not None:
        if "image" not in spec.modalities:
            raise InvalidRequest(f"The model '{spec.name}' does not embed images; send 'documents'.", "images")
        modality, documents = "image", image_inputs([decode_image_input(v) for v in body.images], settings)
    else:
        check_count(body.documents, settings.max_inputs, "documents")
        if any(text == "" for text in body.documents):
            raise InvalidRequest("'documents' must not contain empty strings.", "documents")
        modality, documents = "text", [{"text": text} for text in body.documents]
    output = "multivector" if spec.multivector else "pooled"
    # Token vectors come normalized from the model, as colpali-engine scores them; pooled ones are
    # normalized here, so that their dot product is the cosine.
    options = dict(cache=body.cache, output=output, normalize=output == "pooled", truncate=body.truncate)
    query, embedded = await asyncio.gather(
        dispatcher.embed(spec.name, "text", [{"text": body.query}], gone, input_type="query", **options),
        dispatcher.embed(spec.name, modality, documents, gone, input_type="document", **options),
    )
    if output == "multivector":
        scores = maxsim(query.arrays[0], embedded.arrays)
    else:
        scores = np.stack(embedded.arrays).astype(np.float32) @ np.asarray(query.arrays[0], np.float32)
    order = np.argsort(-scores, kind="stable")[: body.top_n].tolist()
    return Ranking(spec.name, order, scores, sum(query.tokens) + sum(embedded.tokens))


@router.post("/rerank", summary="Score documents or page images against a query (Cohere / TEI shape)")
async def rerank(
    body: RerankRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    ranking = await rank(body, settings, registry, dispatcher, gone)
    results = []
    for index in ranking.order:
        result = {"index": index, "relevance_score": float(ranking.scores[index])}
        if body.return_documents and body.documents is not None:
            result["document"] = {"text": body.documents[index]}
        results.append(result)
    return json_response(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": ranking.model,
            "results": results,
            "usage": {"prompt_tokens": ranking.tokens, "total_tokens": ranking.tokens},
        }
    )
