"""The web console (plain HTML, CSS and JS in api/console, served as they are) and its sign-in.

Signing in trades an API key, sent once in an Authorization header, for an HttpOnly session
cookie (common.tenants: a token signed with the key, valid for EMBEDQ_CONSOLE_SESSION_S) that
the browser sends with every request of the console, its EventSources and <img>s included; the
key never enters a URL or the browser's storage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Header, Request, Response
from starlette.staticfiles import StaticFiles

from common.errors import Unauthorized

from ..auth import REFUSAL, SESSION_COOKIE
from ..deps import SettingsDep
from ..responses import json_response

ASSETS = Path(__file__).resolve().parent.parent / "console"

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)


def assets() -> StaticFiles:
    return StaticFiles(directory=ASSETS, html=True)


@router.get("/session")
async def session_needed(request: Request) -> Response:
    """Whether this API asks for a key (the console then offers to sign out)."""
    return json_response({"object": "session", "auth": not request.app.state.ring.open})


@router.post("/session")
async def sign_in(request: Request, settings: SettingsDep, authorization: str = Header(default="")) -> Response:
    ring = request.app.state.ring
    if ring.open:
        return json_response({"object": "session", "auth": False})
    token = ring.session_token(authorization, settings.console_session_s)
    if token is None:
        raise Unauthorized(REFUSAL.message)
    response = json_response({"object": "session", "auth": True, "expires_in": settings.console_session_s})
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.console_session_s,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.delete("/session")
async def sign_out() -> Response:
    response = json_response({"object": "session", "deleted": True})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
