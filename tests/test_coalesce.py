"""Concurrent requests coalesced into one task (api.coalesce) each get exactly their own answer:
a real Redis, a real MiniLM worker process and the real API, against sentence-transformers."""

from __future__ import annotations

import asyncio
import base64
import uuid

import httpx
import numpy as np

from .conftest import MINILM
from .test_cache import metric


def burst(api_url: str, bodies: list[dict]) -> list[httpx.Response]:
    """All of `bodies` posted to /v1/embeddings at once."""

    async def post_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for body in bodies))

    return asyncio.run(post_all())


def vectors(response: httpx.Response) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), np.float32) for d in response.json()["data"]])


def requests_of(tag: str, count: int) -> list[list[str]]:
    """`count` requests of 1 to 3 texts each, unlike any other test's (no cache answers them)."""
    return [[f"Request {i} text {j} of {tag}: queues batch work." for j in range(1 + i % 3)] for i in range(count)]


def test_coalesced_requests_get_their_own_vectors_and_usage(api_url, reference_minilm):
    tag = uuid.uuid4().hex
    inputs = requests_of(tag, 48)
    tasks, carried = metric(api_url, "embedq_coalesced_tasks_total"), metric(api_url, "embedq_coalesced_requests_total")
    responses = burst(api_url, [{"model": MINILM, "input": texts, "encoding_format": "base64"} for texts in inputs])
    sent = metric(api_url, "embedq_coalesced_tasks_total") - tasks
    assert metric(api_url, "embedq_coalesced_requests_total") - carried == len(inputs)
    assert sent < len(inputs) / 2  # they went together, or this test proves nothing
    tokenizer = reference_minilm.tokenizer
    for texts, response in zip(inputs, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        np.testing.assert_allclose(vectors(response), reference_minilm.encode(texts), atol=2e-5)
        tokens = sum(len(tokenizer(text)["input_ids"]) for text in texts)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_one_bad_input_fails_only_its_own_request(api_url, reference_minilm):
    tag = uuid.uuid4().hex
    inputs = requests_of(tag, 40)
    bad = {7, 23}
    for i in bad:  # too long for the model, which the worker finds when it tokenizes
        inputs[i] = [f"{tag} short", "tokens " * 400]
    bodies = [{"model": MINILM, "input": texts, "encoding_format": "base64", "truncate": False} for texts in inputs]
    tasks = metric(api_url, "embedq_coalesced_tasks_total")
    responses = burst(api_url, bodies)
    # a failed coalesced task is halved until the bad requests stand alone: fewer tasks than requests
    assert metric(api_url, "embedq_coalesced_tasks_total") - tasks < len(inputs)
    for i, (texts, response) in enumerate(zip(inputs, responses)):
        if i in bad:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "context_length_exceeded" and error["param"] == "input"
        else:
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(vectors(response), reference_minilm.encode(texts), atol=2e-5)


def test_requests_with_other_options_are_not_mixed(api_url, reference_minilm):
    tag = uuid.uuid4().hex
    inputs = requests_of(tag, 30)
    bodies = [
        {"model": MINILM, "input": texts, "encoding_format": "base64", **({"dimensions": 128} if i % 2 else {})}
        for i, texts in enumerate(inputs)
    ]
    for i, (texts, response) in enumerate(zip(inputs, burst(api_url, bodies))):
        assert response.status_code == 200, response.text
        reference = reference_minilm.encode(texts)
        if i % 2:
            reference = reference[:, :128] / np.linalg.norm(reference[:, :128], axis=1, keepdims=True)
        np.testing.assert_allclose(vectors(response), reference, atol=2e-5)
