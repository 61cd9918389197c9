"""ASGI middleware that checks the API key of every request but health's from its headers alone,
before anything reads the body (an unauthenticated 60 MiB upload is refused at once), and tells
the routes who the caller is (`request.state.principal`, common.tenants)."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import Unauthorized
from common.tenants import KeyRing

from .errors import error_body

# With the compatibility routes: TEI's /health and LAYRA's /healthy-check, open on those servers too.
OPEN_PATHS = frozenset({"/healthz", "/health/live", "/health/ready", "/health", "/healthy-check"})
REFUSAL = Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'.")


class KeyCheck:
    def __init__(self, app: ASGIApp, ring: KeyRing):
        self.app = app
        self.ring = ring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        principal = self.ring.principal(header.decode("latin-1"))
        if principal is None:
            return await self._refuse(send)
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps(error_body(REFUSAL.message, REFUSAL.type, REFUSAL.param, REFUSAL.code))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
            # The body was not read: the client must not send another request on this connection.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
