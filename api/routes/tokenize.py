"""`POST /v1/tokenize`: a text's tokens by the model's own tokenizer, so a client can count and cut
before it sends. A worker of the model tokenizes (the API process holds no tokenizer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from common.errors import InvalidRequest
from common.inputs.text import check_count
from common.registry import ModelSpec
from common.settings import Settings

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from ..dispatch import Dispatcher
from ..responses import json_response
from ..results import Gone
from ..schemas import TokenizeRequest

router = APIRouter(prefix="/v1", tags=["tokenize"])

FIELDS = ("id", "text", "special", "start", "stop")


async def token_lists(
    spec: ModelSpec,
    texts: list[str],
    settings: Settings,
    dispatcher: Dispatcher,
    gone: Gone,
    input_type: str = "document",
    add_special_tokens: bool = True,
) -> list[dict[str, Any]]:
    """Per text: the `text` the model tokenized (a query's with its query prefix) and its `tokens`,
    each `{"id", "text", "special", "start", "stop"}` (offsets in characters of that text; none for
    a special token)."""
    if "text" not in spec.modalities:
        raise InvalidRequest(f"The model '{spec.name}' does not take text.", "model")
    check_count(texts, settings.max_inputs, "input")
    answer = await dispatcher.tokenize(spec.name, texts, gone, input_type, add_special_tokens)
    return [
        {"text": text, "tokens": [dict(zip(FIELDS, piece)) for piece in pieces]}
        for text, pieces in zip(answer["texts"], answer["tokens"])
    ]


@router.post("/tokenize", summary="Tokenize texts with the model's tokenizer")
async def tokenize(
    body: TokenizeRequest, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
) -> Response:
    spec = registry.get(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    lists = await token_lists(spec, texts, settings, dispatcher, gone, body.input_type, body.add_special_tokens)
    return json_response(
        {
            "object": "list",
            "model": spec.name,
            "max_input_tokens": spec.token_limit,
            "data": [{"index": i, "count": len(entry["tokens"]), **entry} for i, entry in enumerate(lists)],
        }
    )
