"""Bounded input: each limit answers a clear 4xx with OpenAI's error body before any work is
queued, and text that is not valid Unicode is a 400, never a 500 (real API, real MiniLM worker,
real Milvus Lite server)."""

from __future__ import annotations

import json

import httpx
import pytest

from common.settings import Settings
from common.store.limits import FILENAME_MAX, ID_MAX

from .conftest import MINILM
from .test_api_errors import assert_error

DEFAULTS = Settings()
SURROGATE = '"\\ud800"'  # a JSON string holding a lone surrogate


def raw_post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)


@pytest.fixture(scope="module")
def collection(api_url) -> str:
    response = httpx.post(f"{api_url}/v1/collections", json={"name": "limits", "model": MINILM}, timeout=30)
    assert response.status_code in (201, 400), response.text
    return "limits"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", '{"model": S, "input": "hi"}'),
        ("/v1/embeddings", '{"model": "' + MINILM + '", "input": S}'),
        ("/v1/embeddings/image", '{"model": S, "images": []}'),
        ("/v1/embeddings/text", '{"model": S, "input": "hi"}'),
        ("/v1/collections", '{"name": "x", "model": S}'),
    ],
)
def test_a_lone_surrogate_is_a_400(api_url, path, body):
    assert_error(raw_post(f"{api_url}{path}", body.replace("S", SURROGATE)), 400)


def test_text_that_is_not_utf8_in_a_form_is_a_4xx(api_url):
    fields = [("model", (None, b"\xed\xa0\x80")), ("images", ("p.png", b"\x89PNG", "image/png"))]
    assert_error(httpx.post(f"{api_url}/v1/embeddings/image", files=fields, timeout=30), 404, "model")


def test_a_lone_surrogate_in_a_search_is_a_400(api_url, collection):
    response = raw_post(f"{api_url}/v1/collections/{collection}/search", '{"query": ' + SURROGATE + "}")
    assert_error(response, 400, "query")


def upload(api_url: str, collection: str, files: list, metadata=None) -> httpx.Response:
    data = {"metadata": metadata} if metadata is not None else {}
    return httpx.post(f"{api_url}/v1/collections/{collection}/documents", files=files, data=data, timeout=30)


def test_upload_limits(api_url, collection):
    text = ("note.txt", b"Some text to embed.", "text/plain")
    big = json.dumps({"note.txt": {"blob": "x" * DEFAULTS.max_metadata_bytes}})
    error = assert_error(upload(api_url, collection, [("files", text)], big), 400, "metadata")
    assert "EMBEDQ_MAX_METADATA_BYTES" in error["message"]
    long_id = json.dumps([{"doc_id": "d" * (ID_MAX + 1)}])
    assert_error(upload(api_url, collection, [("files", text)], long_id), 400, "metadata")
    long_name = ("n" * FILENAME_MAX + ".txt", b"text", "text/plain")
    assert_error(upload(api_url, collection, [("files", long_name)]), 400, "files")
    many = [("files", (f"f{i}.txt", b"x", "text/plain")) for i in range(DEFAULTS.max_files_per_upload + 1)]
    assert_error(upload(api_url, collection, many), 400, "files")
    surrogate_metadata = '[{"src": ' + SURROGATE + "}]"
    assert_error(upload(api_url, collection, [("files", text)], surrogate_metadata), 400, "metadata")


def test_search_limits(api_url, collection):
    url = f"{api_url}/v1/collections/{collection}/search"
    long_query = {"query": "q" * (DEFAULTS.max_query_chars + 1)}
    assert_error(httpx.post(url, json=long_query, timeout=30), 400, "query")
    long_filter = {"query": "q", "filter": "doc_id == 'x' or " * (DEFAULTS.max_filter_chars // 10)}
    assert_error(httpx.post(url, json=long_filter, timeout=30), 400, "filter")
