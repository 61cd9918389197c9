"""Compatibility routes: the paths and shapes that the clients of other embedding servers call
(Hugging Face TEI, Infinity, LAYRA's ColQwen2.5 model server), switched on per family by
EMBEDQ_COMPAT. Each route is a translation into the native routes' own functions, so auth, limits,
queues, the cache and errors are the native ones; only the shapes (and, for TEI, the error body)
are the peer's."""

from __future__ import annotations

from fastapi import FastAPI

from . import infinity, layra, rerank, tei


def register(app: FastAPI, families: list[str]) -> None:
    """Serve the compatibility routes of `families` (common.settings.COMPAT_FAMILIES)."""
    routers = {"tei": tei.router, "infinity": infinity.router, "layra": layra.router}
    for family in families:
        app.include_router(routers[family])
    if ranking := [family for family in families if family in rerank.FAMILIES]:
        app.include_router(rerank.router(ranking))
