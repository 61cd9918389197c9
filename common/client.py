"""Submitting tasks straight to the queues, for Python backends that skip the HTTP API.

It sends the documented tasks `embedq.embed` and `embedq.search_pages` through the shared Celery
app, whose router puts them on `embed.<model>.<modality>` and `search.pages`. Vectors come back as
bytes and are decoded with `common.vectors.unpack`.
A worker's error comes back as its `common.errors` class: Celery rebuilds a task failure from the
module and class name it stores when that module is imported in the waiting process, as it is here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from .contract import EMBED_TASK, SEARCH_TASK, embed_kwargs, search_kwargs
from .delivery.app import create_celery_app
from .errors import ServiceUnavailable
from .settings import Settings, get_settings
from .vectors import unpack


class EmbedqClient:
    """`submit_*` return a Celery `AsyncResult` at once (its `.get()` gives the task's dict);
    `embed_*` wait and return one array per input: `(dim,)` pooled, `(n_tokens, dim)` multivector."""

    def __init__(self, redis_url: str | None = None):
        self.settings = get_settings() if redis_url is None else Settings(redis_url=redis_url)
        self.celery = create_celery_app(self.settings)

    def submit(
        self, model: str, modality: str, inputs: list[dict[str, Any]], *, expires: float | None = None, **options: Any
    ) -> AsyncResult:
        """Any inputs the task takes (`{"text"}`, `{"token_ids"}`, `{"image"}`); a worker drops the task
        unrun if it is still queued `expires` seconds from now."""
        return self.celery.send_task(
            EMBED_TASK, kwargs=embed_kwargs(model, modality, inputs, **options), expires=expires
        )

    def submit_texts(
        self,
        model: str,
        texts: list[str],
        *,
        output: str = "pooled",
        input_type: str = "document",
        normalize: bool | None = None,
        dimensions: int | None = None,
        truncate: bool = True,
        dtype: str = "float32",
        expires: float | None = None,
    ) -> AsyncResult:
        return self.submit(
            model,
            "text",
            [{"text": text} for text in texts],
            expires=expires,
            output=output,
            input_type=input_type,
            normalize=normalize,
            dimensions=dimensions,
            truncate=truncate,
            dtype=dtype,
        )

    def submit_images(
        self,
        model: str,
        images: list[bytes],
        *,
        output: str = "multivector",
        normalize: bool | None = None,
        dimensions: int | None = None,
        dtype: str = "float32",
        expires: float | None = None,
    ) -> AsyncResult:
        """`images` are encoded image files (PNG, JPEG, ...)."""
        return self.submit(
            model,
            "image",
            [{"image": image} for image in images],
            expires=expires,
            output=output,
            normalize=normalize,
            dimensions=dimensions,
            dtype=dtype,
        )

    def _answer(self, result: AsyncResult, timeout: float | None) -> Any:
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        try:
            answer = result.get(timeout=timeout)
            result.forget()  # read: Redis need not keep it
            return answer
        except CeleryTimeout:
            raise ServiceUnavailable(
                f"No worker answered task {result.id} within {timeout:g}s; is a worker serving its queue?"
            ) from None

    def wait(self, result: AsyncResult, timeout: float | None = None) -> list[np.ndarray]:
        """The arrays of a submitted task; raises the worker's error, or ServiceUnavailable once
        `timeout` seconds (default: EMBEDQ_REQUEST_TIMEOUT_S) pass without an answer."""
        return unpack(self._answer(result, timeout))

    def embed_texts(
        self, model: str, texts: list[str], *, timeout: float | None = None, **options: Any
    ) -> list[np.ndarray]:
        """`submit_texts` then `wait`; the task expires with the wait, so nobody runs it for no one."""
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        return self.wait(self.submit_texts(model, texts, expires=timeout, **options), timeout)

    def embed_images(
        self, model: str, images: list[bytes], *, timeout: float | None = None, **options: Any
    ) -> list[np.ndarray]:
        """`submit_images` then `wait`, as `embed_texts`."""
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        return self.wait(self.submit_images(model, images, expires=timeout, **options), timeout)

    def search_pages(
        self,
        collection: str,
        query: np.ndarray,
        *,
        top_k: int = 10,
        filter: str | None = None,
        tenant: str | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """The `top_k` pages of a late-interaction collection by exact MaxSim with `query` (its
        `(n_tokens, dim)` token vectors, as `embed_texts(..., output="multivector",
        input_type="query")` gives them): `[{doc_id, filename, page, score, metadata}]`.
        `tenant`: search only if the collection is that tenant's (a 404-like NotFound otherwise)."""
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        kwargs = search_kwargs(collection, query, top_k, filter, tenant=tenant)
        return self._answer(self.celery.send_task(SEARCH_TASK, kwargs=kwargs, expires=timeout), timeout)

    def close(self) -> None:
        self.celery.close()
