"""ASGI middleware that checks the API key of every request but health's and the console's assets
from its headers alone, before anything reads the body (an unauthenticated 60 MiB upload is refused
at once), and tells the routes who the caller is (`request.state.principal`, common.tenants).

A request without an Authorization header may instead carry the console's session cookie (a
token signed with a key, common.tenants): a browser's EventSource and <img> cannot send headers.
The cookie is HttpOnly and SameSite=Strict, so scripts cannot read it and other sites cannot send it.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from common.errors import Unauthorized
from common.tenants import KeyRing

from .errors import error_body

# With the compatibility routes: TEI's /health and LAYRA's /healthy-check, open on those servers too.
OPEN_PATHS = frozenset({"/healthz", "/health/live", "/health/ready", "/health", "/healthy-check", "/console"})
CONSOLE = "/console/"  # the console's assets, and its sign-in, which checks the key itself
SESSION_COOKIE = "embedq_session"
REFUSAL = Unauthorized("Missing or invalid API key: send 'Authorization: Bearer <key>'.")


class KeyCheck:
    def __init__(self, app: ASGIApp, ring: KeyRing):
        self.app = app
        self.ring = ring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["path"].startswith(CONSOLE):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if b"authorization" in headers or b"cookie" not in headers:
            principal = self.ring.principal(headers.get(b"authorization", b"").decode("latin-1"))
        else:
            principal = self.ring.session(_session_cookie(headers[b"cookie"].decode("latin-1")))
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


def _session_cookie(header: str) -> str:
    try:
        morsel = SimpleCookie(header).get(SESSION_COOKIE)
    except CookieError:
        return ""
    return morsel.value if morsel else ""
