"""`POST /rerank`, which TEI and Infinity both serve at the root in different shapes: a body with
`texts` is TEI's, one with `documents` Infinity's (Cohere's); one with neither goes to the first of
them in EMBEDQ_COMPAT, which names what is missing."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from ..deps import DispatcherDep, GoneDep, RegistryDep, SettingsDep
from . import infinity, tei

FAMILIES = ("tei", "infinity")
_BODY = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {"oneOf": [tei.RerankRequest.model_json_schema(), infinity.RerankRequest.model_json_schema()]}
            }
        },
        "required": True,
    }
}


def router(families: list[str]) -> APIRouter:
    """The shared route, for `families` (those of FAMILIES that are on, in EMBEDQ_COMPAT's order)."""
    shared = APIRouter(tags=["compatibility: TEI", "compatibility: Infinity"])

    @shared.post("/rerank", summary="TEI (`texts`) or Infinity / Cohere (`documents`) rerank", openapi_extra=_BODY)
    async def rerank(
        request: Request, settings: SettingsDep, registry: RegistryDep, dispatcher: DispatcherDep, gone: GoneDep
    ) -> Response:
        raw = await request.body()
        if _family(raw, families) == "tei":
            return await tei.translated(tei.rerank(raw, settings, registry, dispatcher, gone))
        return await infinity.rerank(raw, settings, registry, dispatcher, gone)

    return shared


def _family(raw: bytes, families: list[str]) -> str:
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return families[0]
    keys = fields.keys() if isinstance(fields, dict) else ()
    for family, key in (("tei", "texts"), ("infinity", "documents")):
        if key in keys and family in families:
            return family
    return families[0]
