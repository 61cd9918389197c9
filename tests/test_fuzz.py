"""No 5xx on any input: schemathesis generates requests from the API's own OpenAPI schema (valid
and invalid ones) against the real API, MiniLM worker and Milvus Lite server, and every answer
must be under 500. Path parameters name, half of the time, things that exist (a collection with
documents, a job, the served model), so that the cases reach the handlers rather than only their
404s; bodies name the served model half of the time.

Every 500 this found has a regression test in test_limits.py (lone surrogates).
"""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from common.launch import procs

from .conftest import MINILM
from .stack import spawn

COLLECTION = "fuzzed"


@pytest.fixture(scope="module")
def real(api_url, stack_env, logs) -> dict[str, str]:
    """A collection with a document, and the job that stored it (ended, so its event stream ends)."""
    ingest = spawn(["ingest-worker"], stack_env, logs / "fuzz-ingest.log")
    try:
        httpx.post(f"{api_url}/v1/collections", json={"name": COLLECTION, "model": MINILM}, timeout=30)
        files = [("files", ("fuzz.txt", b"Schemathesis sends what the schema allows, and more.", "text/plain"))]
        job = httpx.post(f"{api_url}/v1/collections/{COLLECTION}/documents", files=files, timeout=30).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{api_url}/v1/jobs/{job['id']}").json()["finished_at"] is None:
            assert time.monotonic() < deadline, "the fuzzed collection's job did not end"
            time.sleep(0.2)
    finally:
        procs.stop([ingest])
    return {"name": COLLECTION, "job_id": job["id"], "model_id": MINILM, "doc_id": job["files"][0]["doc_id"]}


@pytest.fixture(scope="module")
def api_schema(api_url, real):
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    turn = iter(range(10**9))

    @schema.hook
    def map_path_parameters(ctx, path_parameters):
        if path_parameters and next(turn) % 2:
            return {key: real.get(key, value) for key, value in path_parameters.items()}
        return path_parameters

    @schema.hook
    def map_body(ctx, body):
        if isinstance(body, dict) and "model" in body and next(turn) % 2:
            return {**body, "model": MINILM}
        return body

    return schema


@pytest.mark.slow
def test_no_input_gets_a_server_error(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def call(case) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.body!r:.300}: {response.status_code} {response.text[:300]}"
            )

        call()
