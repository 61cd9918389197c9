"""One place that turns errors into HTTP answers with OpenAI's error body:
`{"error": {"message", "type", "param", "code"}}`. The body is written as ASCII JSON, so an error
quoting what the client sent (a lone surrogate, say) can always be written."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis import RedisError
from starlette.exceptions import HTTPException

from common.errors import EmbedqError, QueueFull


class ErrorResponse(JSONResponse):
    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _embedq_error(_: Request, exc: EmbedqError) -> ErrorResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QueueFull) else None
    return ErrorResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first failure of a request that FastAPI refused: a message naming the field, and the field."""
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = location[0] if location else None
    return f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid value')}", param


def _validation_error(_: Request, exc: RequestValidationError) -> ErrorResponse:
    message, param = validation_message(exc)
    return ErrorResponse(error_body(message, "invalid_request_error", param, "invalid_value"), 400)


def _http_error(_: Request, exc: HTTPException) -> ErrorResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return ErrorResponse(error_body(str(exc.detail), type_), exc.status_code, headers=exc.headers)


def _unreachable(_: Request, exc: Exception) -> ErrorResponse:
    """Redis (the queue) is away, restarting say: the request could not be taken; 503, retry later."""
    message = f"The queue is not reachable right now ({type(exc).__name__}); try again shortly."
    return ErrorResponse(
        error_body(message, "server_error", None, "service_unavailable"), 503, headers={"Retry-After": "1"}
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EmbedqError, _embedq_error)
    app.add_exception_handler(RedisError, _unreachable)
    app.add_exception_handler(OperationalError, _unreachable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
