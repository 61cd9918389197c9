"""The one error hierarchy of embedq; `api.errors` maps it to HTTP statuses and OpenAI error bodies.

Workers raise these inside Celery tasks; Celery rebuilds a stored task failure from its module
path and class name in the waiting process, so an error keeps its kind, message and parameter
across the queue (which is why this module's path is public).
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base class. `status` and `type` follow OpenAI's error body."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class InvalidRequest(EmbedqError):
    status = 400
    type = "invalid_request_error"


class InputTooLong(InvalidRequest):
    code = "context_length_exceeded"


class EmptyInput(InvalidRequest):
    code = "empty_input"


class TooManyInputs(InvalidRequest):
    code = "too_many_inputs"


class Unauthorized(EmbedqError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(EmbedqError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class TooLarge(EmbedqError):
    """A request whose answer would be over a size limit (the limit is in the message)."""

    status = 413
    type = "invalid_request_error"
    code = "too_large"


class UnsupportedMediaType(EmbedqError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class QueueFull(EmbedqError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1


class ServiceUnavailable(EmbedqError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class BackendError(EmbedqError):
    """A model failed on a batch that should have run; every request of that batch gets it."""

    code = "backend_error"
